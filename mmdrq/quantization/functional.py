"""Double Rounding as tensor functions, with their straight-through gradients.

Everything here is stateless. ``fake_quant`` is the one autograd entry point:
the weight quantizers, the unshared-scale baseline and the activation
quantizer all call it with different integer limits and shifts.

Two implementations compute the same numbers (``set_fake_quant_impl``):

- ``torch``: plain torch ops, about ten passes over memory per call.
- ``fused``: the same math compiled once by Inductor with dynamic shapes
  into one kernel for the forward and one for the backward (C++/OpenMP on
  the CPU, Triton on CUDA); the limits travel as a small cached tensor, so
  one kernel serves every bit and layer.

``auto`` (the default, or ``MMDRQ_FAKE_QUANT``) takes ``fused`` and falls
back to ``torch`` with a warning if Inductor cannot build it. Inside a
``torch.compile``-d model the plain math is traced instead, so Inductor fuses
it with the neighbouring ops; double backward (Hessian traces) always runs
the plain math.
"""
import contextlib
import math
import os
import warnings

import torch

ROUNDINGS = ('half_even', 'half_up')
VARIANTS = ('double_rounding', 'floor')
IMPLS = ('auto', 'torch', 'fused')


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f'fake-quant impl (MMDRQ_FAKE_QUANT) must be one of '
                         f'{list(IMPLS)}, got {impl!r}')
    return impl


_impl = _check_impl(os.environ.get('MMDRQ_FAKE_QUANT', 'auto'))
_fused_state = {'ok': None, 'fns': None}
_limits_cache = {}


def set_fake_quant_impl(impl: str):
    """Choose ``auto``, ``torch`` or ``fused`` for every later call."""
    global _impl
    _impl = _check_impl(impl)


def get_fake_quant_impl() -> str:
    return _impl


@contextlib.contextmanager
def fake_quant_impl(impl: str):
    """``set_fake_quant_impl`` for a ``with`` block."""
    old = get_fake_quant_impl()
    set_fake_quant_impl(impl)
    try:
        yield
    finally:
        set_fake_quant_impl(old)


def _check_modes(rounding: str, variant: str):
    if rounding not in ROUNDINGS:
        raise ValueError(
            f'rounding must be one of {list(ROUNDINGS)}, got {rounding!r}')
    if variant not in VARIANTS:
        raise ValueError(
            f'variant must be one of {list(VARIANTS)}, got {variant!r}')


def _round_down(q, down, lo, hi, rounding, variant):
    """``q * down`` (``down = 2**-shift``, exact) rounded, then clipped;
    ``lo``/``hi``/``down`` are numbers or 0-dim tensors. For the fused
    kernels ``rounding`` is a 0-dim tensor code (``_MODE_CODES``), so one
    kernel serves every mode."""
    scaled = q * down
    if isinstance(rounding, torch.Tensor):
        scaled = torch.where(rounding == 0, torch.round(scaled),
                             torch.floor(scaled + 0.5 * (rounding == 1)))
    elif variant == 'floor':
        scaled = scaled.floor_()  # in place on the fresh product
    elif rounding == 'half_even':
        scaled = scaled.round_()
    else:
        scaled = scaled.add_(0.5).floor_()
    return torch.clamp(scaled, lo, hi)


def requantize(q_h: torch.Tensor, shift: int, lo: int, hi: int,
               rounding: str = 'half_even',
               variant: str = 'double_rounding') -> torch.Tensor:
    """Second rounding: integers of the stored precision -> integers of a
    precision ``shift`` bits lower, clipped to ``[lo, hi]``.

    ``q_h`` holds integer values (any float or int dtype); the result is in
    the dtype of ``q_h``'s float form. ``half_up`` equals the integer shift
    ``(q + 2**(shift-1)) >> shift``; ``floor`` equals ``q >> shift``.
    """
    _check_modes(rounding, variant)
    q_h = q_h if q_h.is_floating_point() else q_h.float()
    if shift == 0:
        return q_h
    return _round_down(q_h, 2.0**-shift, lo, hi, rounding, variant)


def _quantize(x, scale, h_lo, h_hi, down, l_lo, l_hi, rounding, variant):
    """First rounding of ``x / scale`` to the stored grid, second rounding
    by ``down``; every kernel and reference path goes through here."""
    q_h = torch.clamp((x / scale).round_(), h_lo, h_hi)
    return _round_down(q_h, down, l_lo, l_hi, rounding, variant)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, h_range, shift: int,
                 l_range, rounding: str = 'half_even',
                 variant: str = 'double_rounding') -> torch.Tensor:
    """Integers of the target precision (as floats): first rounding of
    ``x / scale`` to the stored grid ``h_range``, then the second rounding by
    ``shift`` bits to ``l_range``. ``scale`` broadcasts against ``x``."""
    _check_modes(rounding, variant)
    return _quantize(x, scale, h_range[0], h_range[1], 2.0**-shift,
                     l_range[0], l_range[1], rounding, variant)


def _forward(x, scale, h_lo, h_hi, down, l_lo, l_hi, up, rounding, variant):
    """``q_l * scale * 2**shift`` in ``x``'s dtype (computed in ``scale``'s
    precision at least: bf16 activations are not rounded on a bf16 grid)."""
    xf = x.to(torch.promote_types(x.dtype, scale.dtype))
    q = _quantize(xf, scale, h_lo, h_hi, down, l_lo, l_hi, rounding, variant)
    return (q * (scale * up)).to(x.dtype)


def _backward_parts(grad, x, scale, h_lo, h_hi, down, l_lo, l_hi, up,
                    rounding, variant, with_graph=False):
    """STE gradient of ``x`` and, per element, the LSQ scale gradient before
    its factor: ``grad * (q - v)`` inside the range, ``grad * q`` outside
    (the clipping limit). ``with_graph`` keeps it differentiable."""
    xf = x.to(torch.promote_types(x.dtype, scale.dtype))
    q = _quantize(xf.detach(), scale.detach(), h_lo, h_hi, down, l_lo, l_hi,
                  rounding, variant)
    v = xf / (scale * up)
    inside = (v >= l_lo) & (v <= l_hi)
    grad_x = torch.where(inside, grad, 0.0)
    if with_graph:
        return grad_x, grad * torch.where(inside, q - v, q)
    # in v's memory: fresh large buffers cost page faults on the CPU
    return grad_x, v.masked_fill_(~inside, 0.0).neg_().add_(q).mul_(grad)


def _fused_backward(grad, x, scale, h_lo, h_hi, down, l_lo, l_hi, up,
                    rounding, variant):
    """``_backward_parts`` with the scale gradient summed per row of the
    2-d ``x``, in the same kernel."""
    grad_x, contrib = _backward_parts(grad, x, scale, h_lo, h_hi, down, l_lo,
                                      l_hi, up, rounding, variant)
    return grad_x, contrib.sum(dim=1, keepdim=True)


def _fused_fns():
    if _fused_state['fns'] is None:
        _fused_state['fns'] = (
            torch.compile(_forward, dynamic=True),
            torch.compile(_fused_backward, dynamic=True))
    return _fused_state['fns']


def _limits(h_range, shift, l_range, mode: int, like: torch.Tensor):
    """The plan as 0-dim tensors on ``like``'s device, made once per plan
    and device: no host-to-device copy per call, and no recompiles, since
    the kernels see tensors rather than Python numbers."""
    key = (tuple(h_range), shift, tuple(l_range), mode, like.device,
           like.dtype)
    limits = _limits_cache.get(key)
    if limits is None:
        values = torch.tensor([h_range[0], h_range[1], 2.0**-shift,
                               l_range[0], l_range[1], 2.0**shift, mode],
                              dtype=like.dtype, device=like.device)
        limits = _limits_cache[key] = tuple(values.unbind())
    return limits


def _use_fused(x, scale, reduce_dims) -> bool:
    """Whether this call can take the fused kernels: one scale, or one per
    row of ``x`` reduced per row or over everything."""
    if _impl == 'torch' or _fused_state['ok'] is False \
            or torch.compiler.is_compiling() \
            or x.device.type not in ('cpu', 'cuda'):
        return False
    if scale.numel() == 1:
        return True
    rows = reduce_dims is None or tuple(reduce_dims) == tuple(
        range(1, x.dim()))
    return rows and x.dim() >= 1 and scale.numel() == x.shape[0] and \
        scale.shape[0] == x.shape[0]


# Graphs each kernel may keep: dtypes x (one scale | one per row) x
# Inductor's size classes; a model needs a handful, a test session more.
_KERNEL_GRAPHS = 64


def _call_kernel(which: int, args):
    """Run a fused kernel with room for its own graphs, whatever Dynamo's
    global recompile limit (meant for user code) is."""
    config = torch._dynamo.config
    limit = config.recompile_limit
    config.recompile_limit = max(limit, _KERNEL_GRAPHS)
    try:
        return _fused_fns()[which](*args)
    finally:
        config.recompile_limit = limit


def _run_fused(which: int, *args):
    """Call a fused kernel; the first failure to build one (no compiler)
    switches ``auto`` to the torch path for good, with a warning."""
    if _fused_state['ok']:
        return _call_kernel(which, args)
    try:
        out = _call_kernel(which, args)
    except Exception as error:  # noqa: BLE001 - any build failure
        if _impl == 'fused':
            raise
        warnings.warn(f'mmdrq: fused fake quantization is unavailable '
                      f'({type(error).__name__}: {error}); using the torch '
                      f'path (set MMDRQ_FAKE_QUANT=torch to skip the try)')
        _fused_state['ok'] = False
        return None
    _fused_state['ok'] = True
    return out


def _as_rows(x, scale):
    """2-d ``x`` and ``(rows, 1)`` scale, detached: a view's link to its
    base would add guards (and recompiles) to the kernels."""
    rows = 1 if scale.numel() == 1 else x.shape[0]
    return x.reshape(rows, -1).detach(), scale.reshape(rows, 1).detach()


class _FakeQuant(torch.autograd.Function):
    """Forward ``q * scale * 2**shift``; backward STE for ``x`` and LSQ for
    ``scale`` (see ``fake_quant``). Saves only ``x`` and ``scale``: the
    integers are recomputed in the backward, which costs less than keeping
    a tensor of them."""

    @staticmethod
    def forward(ctx, x, scale, h_range, shift, l_range, rounding, variant,
                grad_scale, reduce_dims):
        ctx.save_for_backward(x, scale)
        ctx.plan = (h_range, shift, l_range, rounding, variant)
        ctx.grad_scale = grad_scale
        ctx.reduce_dims = reduce_dims
        if _use_fused(x, scale, reduce_dims):
            x2, s2 = _as_rows(x, scale)
            out = _run_fused(0, x2, s2, *_fused_args(ctx.plan, s2))
            if out is not None:
                return out.view(x.shape)
        return _forward(x, scale, *_number_args(ctx.plan))

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        fused = None
        if not torch.is_grad_enabled() and \
                _use_fused(x, scale, ctx.reduce_dims):
            x2, s2 = _as_rows(x, scale)
            fused = _run_fused(1, grad_out.reshape(x2.shape).detach(), x2,
                               s2, *_fused_args(ctx.plan, s2))
        if fused is not None:  # per-row sums: one row per scale, or one row
            grad_x, partial = fused[0].view(x.shape), fused[1]
            if ctx.reduce_dims is None or partial.numel() == 1:
                partial = partial.sum().expand(scale.shape)
        else:  # torch path; with a graph under double backward
            grad_x, contrib = _backward_parts(
                grad_out, x, scale, *_number_args(ctx.plan),
                with_graph=torch.is_grad_enabled())
            dims = ctx.reduce_dims
            partial = contrib.sum().expand(scale.shape) if dims is None \
                else contrib.sum(dim=dims, keepdim=True)
        grad_scale = (partial.to(scale.dtype) * ctx.grad_scale).reshape(
            scale.shape)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_scale if ctx.needs_input_grad[1] else None,
                None, None, None, None, None, None, None)


def _number_args(plan):
    (h_lo, h_hi), shift, (l_lo, l_hi), rounding, variant = plan
    return h_lo, h_hi, 2.0**-shift, l_lo, l_hi, 2.0**shift, rounding, variant


_MODE_CODES = {'half_even': 0, 'half_up': 1, 'floor': 2}


def _fused_args(plan, scale):
    """Arguments of the fused kernels after ``x`` and ``scale``: limits and
    mode code as tensors, and ``variant`` None (folded into the code)."""
    h_range, shift, l_range, rounding, variant = plan
    mode = _MODE_CODES['floor' if variant == 'floor' else rounding]
    return (*_limits(h_range, shift, l_range, mode, scale), None)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, h_range, shift: int,
               l_range, rounding: str = 'half_even',
               variant: str = 'double_rounding', grad_scale: float = 1.0,
               reduce_dims=None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with Double Rounding, differentiably.

    Args:
        x: the FP tensor (weights ``(C_out, ...)`` or activations).
        scale: positive scale broadcastable to ``x`` (``(C_out, 1, ...)`` per
            channel, a 1-element tensor per tensor).
        h_range: (lo, hi) of the stored grid (first rounding).
        shift: h - l; 0 makes this plain LSQ fake quantization.
        l_range: (lo, hi) of the target grid (second rounding).
        rounding: ``half_even`` (default) or ``half_up`` for the second
            rounding.
        variant: ``double_rounding`` or ``floor`` (right-shift truncation).
        grad_scale: factor on the scale gradient (the LSQ ``g``, times
            ``2**shift`` for the exact chain rule).
        reduce_dims: dims summed for the scale gradient, or None to give
            every channel the sum over the whole tensor.

    Returns:
        ``q_l * scale * 2**shift``, same shape and dtype as ``x``.
    """
    _check_modes(rounding, variant)
    return _FakeQuant.apply(x, scale, tuple(h_range), int(shift),
                            tuple(l_range), rounding, variant,
                            float(grad_scale), reduce_dims)


def lsq_grad_scale(num_elements: int, q_max: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(num_elements, 1) * max(q_max, 1))
