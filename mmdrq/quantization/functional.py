"""Double Rounding as tensor functions, with their straight-through gradients
(docs/method.md, Weight quantizer; Gradients and the LSQ scale gradient).

Everything here is stateless. ``fake_quant_bits`` (several bit-widths from
one first rounding) is the one autograd entry point; ``fake_quant`` is its
one-target form, which the activation quantizer, the weight quantizers and
the unshared-scale baseline call with different integer limits and shifts.

Two implementations compute the same numbers (``set_fake_quant_impl``):

- ``torch``: plain torch ops, about ten passes over memory per call.
- ``fused``: one kernel for the forward and one for the backward, serving
  every bit and layer. On the CPU they are C++/OpenMP (``cpu_kernels``,
  ``csrc/fake_quant.cpp``), called without any dispatch of a compiler; on
  CUDA the math below compiled by Inductor (Triton) with dynamic shapes,
  the limits travelling as small cached tensors.

``auto`` (the default, or ``MMDRQ_FAKE_QUANT``) takes ``fused`` and falls
back to ``torch`` with a warning if its kernels cannot be built (no
compiler). Inside a
``torch.compile``-d model the plain math is traced instead, so Inductor fuses
it with the neighbouring ops; double backward (Hessian traces) always runs
the plain math.
"""
import contextlib
import os

import torch

from mmdrq.utils.checks import check_choice

from . import fused_kernels

ROUNDINGS = ('half_even', 'half_up')
# the variants of one stored grid (weight_quantizer.VARIANTS adds the
# 'unshared' baseline, which needs none of this: a shift of 0)
SHARED_GRID_VARIANTS = ('double_rounding', 'floor')
# integer of the scale gradient's residual ``int - v`` inside the range:
# the target's double-rounded q_l, or v rounded once (round(v) as in the
# authors' code)
RESIDUALS = ('double_rounded', 'first_rounding')
IMPLS = ('auto', 'torch', 'fused')
_IMPL_KEY = 'fake-quant impl (MMDRQ_FAKE_QUANT)'
_impl = check_choice(_IMPL_KEY, os.environ.get('MMDRQ_FAKE_QUANT', 'auto'),
                     IMPLS)
_constants_cache = {}


def set_fake_quant_impl(impl: str):
    """Choose ``auto``, ``torch`` or ``fused`` for every later call."""
    global _impl
    _impl = check_choice(_IMPL_KEY, impl, IMPLS)


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
    check_choice('rounding', rounding, ROUNDINGS)
    check_choice('variant', variant, SHARED_GRID_VARIANTS)


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


def _first_rounding(x, scale, h_lo, h_hi):
    """The stored integers ``clip(round(x / scale), h)``."""
    return torch.clamp((x / scale).round_(), h_lo, h_hi)


def _quantize(x, scale, h_lo, h_hi, down, l_lo, l_hi, rounding, variant):
    """First rounding of ``x / scale`` to the stored grid, second rounding
    by ``down``; every kernel and reference path goes through here."""
    return _round_down(_first_rounding(x, scale, h_lo, h_hi), down, l_lo,
                       l_hi, rounding, variant)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, h_range, shift: int,
                 l_range, rounding: str = 'half_even',
                 variant: str = 'double_rounding') -> torch.Tensor:
    """Integers of the target precision (as floats): first rounding of
    ``x / scale`` to the stored grid ``h_range``, then the second rounding by
    ``shift`` bits to ``l_range``. ``scale`` broadcasts against ``x``.
    Computed as the forward does (``_compute_dtype``), so a float64 model's
    integers are its forward's."""
    _check_modes(rounding, variant)
    return _quantize(*_promoted(x, scale), h_range[0], h_range[1],
                     2.0**-shift, l_range[0], l_range[1], rounding, variant)


def _compute_dtype(x, scale) -> torch.dtype:
    """The precision of every step before the output: ``x``'s and
    ``scale``'s, and float32 at least, so bf16/fp16 values are not divided
    and rounded on their own coarse grid (Inductor upcasts them the same
    way inside the fused kernels)."""
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype),
                               torch.float32)


def _promoted(x, scale):
    """``x`` and ``scale`` in ``_compute_dtype``."""
    dtype = _compute_dtype(x, scale)
    return x.to(dtype), scale.to(dtype)


def _forward(x, scale, h_lo, h_hi, grids, rounding, variant):
    """``q_l * scale * 2**shift`` in ``x``'s dtype for every target of
    ``grids`` (``(down, l_lo, l_hi, up)`` each), all from one first
    rounding."""
    xf, sf = _promoted(x, scale)
    q_h = _first_rounding(xf, sf, h_lo, h_hi)
    return [(_round_down(q_h, down, lo, hi, rounding, variant) *
             (sf * up)).to(x.dtype) for down, lo, hi, up in grids]


def _residual_int(q, v, inside, residual, lo, hi, rounding, variant):
    """The integer of the scale gradient's residual: ``q`` (the target's
    clipped, double-rounded integer) or, for ``first_rounding`` (tensor
    code 1 in the kernels), ``v`` rounded once inside the range by the
    second rounding's rule: round(v) as in the authors' code, floor(v)
    for the floor variant (whose forward round(v) would contradict)."""
    if isinstance(residual, torch.Tensor):
        once = _round_down(v, 1.0, lo, hi, rounding, variant)
        return torch.where(inside & (residual == 1), once, q)
    if residual == 'first_rounding':
        once = _round_down(v, 1.0, lo, hi, rounding, variant)
        return torch.where(inside, once, q)
    return q


def _backward(grads, x, scale, h_lo, h_hi, grids, rounding, variant,
              residual, with_graph=False):
    """STE gradient of ``x`` summed over the targets, and per target and
    element the LSQ scale gradient before its factor: ``grad * (r - v)``
    inside the range, with ``r`` the ``residual``'s integer (q or
    round(v)), ``grad * q`` outside (the clipping limit). ``with_graph``
    keeps it differentiable."""
    xf, sf = _promoted(x, scale)
    q_h = _first_rounding(xf.detach(), sf.detach(), h_lo, h_hi)
    grad_x, contribs = None, []
    for grad, (down, lo, hi, up) in zip(grads, grids):
        q = _round_down(q_h, down, lo, hi, rounding, variant)
        v = xf / (sf * up)
        inside = (v >= lo) & (v <= hi)
        q = _residual_int(q, v.detach(), inside, residual, lo, hi,
                          rounding, variant)
        part = torch.where(inside, grad, 0.0)
        grad_x = part if grad_x is None else grad_x + part
        if with_graph:
            contribs.append(grad * torch.where(inside, q - v, q))
        else:  # in v's memory: fresh buffers cost page faults on the CPU
            contribs.append(v.masked_fill_(~inside, 0.0).neg_().add_(q)
                            .mul_(grad))
    return grad_x, contribs


def _scale_grad(partials, grad_scales):
    """Each target's LSQ factor on its own partial sums, summed, in the
    compute dtype: a bf16 scale's gradient is rounded once, at the end."""
    return sum(p * factor for p, factor in zip(partials, grad_scales))


def _fused_backward(grads, x, scale, h_lo, h_hi, grids, rounding, variant,
                    residual):
    """``_backward`` with the scale gradients summed per row of the 2-d
    ``x``, in the same kernel."""
    grad_x, contribs = _backward(grads, x, scale, h_lo, h_hi, grids,
                                 rounding, variant, residual)
    return grad_x, [c.sum(dim=1, keepdim=True) for c in contribs]


def _as_tensors(numbers, device, dtype):
    """Numbers as 0-dim tensors, made once per value, device and dtype: no
    host-to-device copy per call, and no recompiles, since the kernels see
    tensors rather than Python numbers."""
    key = (numbers, device, dtype)
    tensors = _constants_cache.get(key)
    if tensors is None:
        tensors = _constants_cache[key] = tuple(torch.tensor(
            numbers, dtype=dtype, device=device).unbind())
    return tensors


def _use_fused(x, scale, reduce_dims) -> bool:
    """Whether this call can take the fused kernels: one scale, or one per
    row of ``x`` reduced per row or over everything."""
    if _impl == 'torch' or torch.compiler.is_compiling() \
            or scale.device != x.device \
            or not fused_kernels.usable(x.device.type):
        return False  # another device's scale: torch's own error
    if x.device.type == 'cpu' and _compute_dtype(x, scale) != \
            torch.promote_types(x.dtype, torch.float32):
        return False  # e.g. a float64 scale for float32 data: torch path
    if scale.numel() == 1:
        return True
    rows = reduce_dims is None or tuple(reduce_dims) == tuple(
        range(1, x.dim()))
    return rows and x.dim() >= 1 and scale.numel() == x.shape[0] and \
        scale.shape[0] == x.shape[0]


_MODE_CODES = {'half_even': 0, 'half_up': 1, 'floor': 2}


class _QuantSpec:
    """One call's grids: the stored range, then per target ``(shift,
    l_range, grad_scale)``, as Python numbers for the torch path and as
    cached 0-dim tensors for the kernels."""

    def __init__(self, h_range, targets, rounding, variant, residual):
        self.h_range = tuple(h_range)
        self.targets = tuple((int(shift), tuple(l_range), float(grad_scale))
                             for shift, l_range, grad_scale in targets)
        self.rounding, self.variant = rounding, variant
        self.residual = residual

    def numbers(self, keep=None):
        """``(h_lo, h_hi, grids, rounding, variant)`` for ``_forward`` and
        ``_backward``; ``keep`` selects targets by index."""
        return (*self.h_range, [
            (2.0**-shift, lo, hi, 2.0**shift)
            for shift, (lo, hi), _ in self._select(keep)],
            self.rounding, self.variant)

    def tensors(self, x, scale, keep=None):
        """The same for the kernels: numbers and the rounding mode as
        tensors in the compute dtype (float32 limits for bf16 data: 16-bit
        grids need them), ``variant`` None (folded into the mode code)."""
        mode = _MODE_CODES['floor' if self.variant == 'floor'
                           else self.rounding]
        like = (scale.device, _compute_dtype(x, scale))
        h_lo, h_hi, code = _as_tensors((*self.h_range, mode), *like)
        grids = [_as_tensors((2.0**-shift, lo, hi, 2.0**shift), *like)
                 for shift, (lo, hi), _ in self._select(keep)]
        return h_lo, h_hi, grids, code, None

    def grad_scales(self, keep=None):
        return [grad_scale for _, _, grad_scale in self._select(keep)]

    def kernel_numbers(self, keep=None):
        """``(h_lo, h_hi, targets, mode)`` for the CPU kernels, each target
        ``[down, lo, hi, up, grad_scale]``."""
        targets = [[2.0**-shift, lo, hi, 2.0**shift, grad_scale]
                   for shift, (lo, hi), grad_scale in self._select(keep)]
        return float(self.h_range[0]), float(self.h_range[1]), targets, \
            _MODE_CODES['floor' if self.variant == 'floor' else self.rounding]

    def residual_code(self, scale):
        """``residual`` as the kernels' 0-dim tensor code (its index)."""
        return _as_tensors((RESIDUALS.index(self.residual), ),
                           scale.device, torch.int32)[0]

    def _select(self, keep):
        return self.targets if keep is None else \
            [self.targets[i] for i in keep]


def _outputs(x, scale, spec, reduce_dims) -> tuple:
    """The forward's tensors, by the fused kernel where it applies."""
    if _use_fused(x, scale, reduce_dims):
        outs = fused_kernels.run(x.device.type, 'forward', _impl == 'fused',
                                 x, scale, spec)
        if outs is not None:
            return tuple(outs)
    return tuple(_forward(x, scale, *spec.numbers()))


class _FakeQuant(torch.autograd.Function):
    """Forward ``q * scale * 2**shift`` for each target; backward STE for
    ``x`` and LSQ for ``scale``, summed over the targets that got a
    gradient (see ``fake_quant``). Saves only ``x`` and ``scale``: the
    integers are recomputed in the backward, which costs less than keeping
    a tensor of them."""

    @staticmethod
    def forward(ctx, x, scale, spec, reduce_dims):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, scale)
        ctx.spec, ctx.reduce_dims = spec, reduce_dims
        return _outputs(x, scale, spec, reduce_dims)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, scale = ctx.saved_tensors
        spec, dims = ctx.spec, ctx.reduce_dims
        keep = [i for i, grad in enumerate(grad_outs) if grad is not None]
        if not keep:  # no output reached the loss
            return None, None, None, None
        grads = [grad_outs[i] for i in keep]
        whole = dims is None or scale.numel() == 1  # one sum for all
        fused = None
        if not torch.is_grad_enabled() and _use_fused(x, scale, dims):
            fused = fused_kernels.run(x.device.type, 'backward',
                                      _impl == 'fused', grads, x, scale,
                                      spec, keep, whole)
        if fused is not None:
            grad_x, grad_s = fused
        else:  # torch path; with a graph under double backward
            grad_x, contribs = _backward(grads, x, scale,
                                         *spec.numbers(keep), spec.residual,
                                         with_graph=torch.is_grad_enabled())
            grad_s = _scale_grad([c.sum() if whole else
                                  c.sum(dim=dims, keepdim=True)
                                  for c in contribs], spec.grad_scales(keep))
        grad_s = grad_s.to(scale.dtype)
        grad_s = grad_s.reshape(()).expand(scale.shape) if whole \
            else grad_s.reshape(scale.shape)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_s if ctx.needs_input_grad[1] else None, None, None)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, h_range, shift: int,
               l_range, rounding: str = 'half_even',
               variant: str = 'double_rounding', grad_scale: float = 1.0,
               reduce_dims=None,
               residual: str = 'first_rounding') -> torch.Tensor:
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
        residual: the integer of the scale gradient's ``int - v`` inside
            the range, ``first_rounding`` (v rounded once by the second
            rounding's rule: round(v), the authors' code; floor(v) for
            ``floor``) or ``double_rounded`` (q_l); they differ only when
            ``shift > 0``.

    Returns:
        ``q_l * scale * 2**shift``, same shape and dtype as ``x``.
    """
    return fake_quant_bits(x, scale, h_range, [(shift, l_range, grad_scale)],
                           rounding, variant, reduce_dims, residual)[0]


def fake_quant_bits(x: torch.Tensor, scale: torch.Tensor, h_range, targets,
                    rounding: str = 'half_even',
                    variant: str = 'double_rounding',
                    reduce_dims=None,
                    residual: str = 'first_rounding') -> tuple:
    """``fake_quant`` at several targets from one first rounding.

    ``targets`` is a sequence of ``(shift, l_range, grad_scale)``. The
    forward reads ``x`` once and writes one tensor per target; the backward
    is one pass over ``x`` and the targets' gradients, giving ``x`` the sum
    of their straight-through gradients. Equal to calling ``fake_quant``
    per target and summing, for less memory traffic: what a summed loss over
    bits needs while the weights do not change.
    """
    _check_modes(rounding, variant)
    check_choice('residual', residual, RESIDUALS)
    if not targets:
        raise ValueError('fake_quant_bits needs at least one target')
    spec = _QuantSpec(h_range, targets, rounding, variant, residual)
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuant.apply(x, scale, spec, reduce_dims)
    # no graph to build (evaluation, recomputation in a backward)
    return _outputs(x, scale, spec, reduce_dims)
