"""Double Rounding as tensor functions, with their straight-through gradients.

Everything here is stateless. ``fake_quant`` is the one autograd entry point:
the weight quantizers, the unshared-scale baseline and the activation
quantizer all call it with different integer limits and shifts.
"""
import math

import torch

ROUNDINGS = ('half_even', 'half_up')
VARIANTS = ('double_rounding', 'floor')


def requantize(q_h: torch.Tensor, shift: int, lo: int, hi: int,
               rounding: str = 'half_even',
               variant: str = 'double_rounding') -> torch.Tensor:
    """Second rounding: integers of the stored precision -> integers of a
    precision ``shift`` bits lower, clipped to ``[lo, hi]``.

    ``q_h`` holds integer values (any float or int dtype); the result is in
    the dtype of ``q_h``'s float form. ``half_up`` equals the integer shift
    ``(q + 2**(shift-1)) >> shift``; ``floor`` equals ``q >> shift``.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(
            f'rounding must be one of {list(ROUNDINGS)}, got {rounding!r}')
    if variant not in VARIANTS:
        raise ValueError(
            f'variant must be one of {list(VARIANTS)}, got {variant!r}')
    if shift == 0:
        return q_h.float() if not q_h.is_floating_point() else q_h
    q_h = q_h if q_h.is_floating_point() else q_h.float()
    scaled = q_h * (2.0**-shift)  # exact: a power-of-two scaling
    # in place on the fresh tensor: one buffer instead of three
    if variant == 'floor':
        scaled.floor_()
    elif rounding == 'half_even':
        scaled.round_()
    else:
        scaled.add_(0.5).floor_()
    return scaled.clamp_(lo, hi)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, h_range, shift: int,
                 l_range, rounding: str = 'half_even',
                 variant: str = 'double_rounding') -> torch.Tensor:
    """Integers of the target precision (as floats): first rounding of
    ``x / scale`` to the stored grid ``h_range``, then the second rounding by
    ``shift`` bits to ``l_range``. ``scale`` broadcasts against ``x``."""
    q_h = (x / scale).round_().clamp_(h_range[0], h_range[1])
    return requantize(q_h, shift, l_range[0], l_range[1], rounding, variant)


class _FakeQuant(torch.autograd.Function):
    """Forward ``q * scale * 2**shift``; backward STE for ``x`` and LSQ for
    ``scale`` (see ``fake_quant``)."""

    @staticmethod
    def forward(ctx, x, scale, h_range, shift, l_range, rounding, variant,
                grad_scale, reduce_dims):
        q = quantize_int(x, scale, h_range, shift, l_range, rounding, variant)
        step = scale * (2.0**shift)
        ctx.save_for_backward(x, step, q)
        ctx.l_range = l_range
        ctx.grad_scale = grad_scale
        ctx.reduce_dims = reduce_dims
        return q * step

    @staticmethod
    def backward(ctx, grad_out):
        x, step, q = ctx.saved_tensors
        lo, hi = ctx.l_range
        v = x / step
        inside = (v >= lo) & (v <= hi)
        # where() instead of a float * bool product: no type promotion
        grad_x = torch.where(inside, grad_out, 0.0) \
            if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            # d(q * step)/d step with STE: q - v inside the range, q (the
            # clipping limit) outside.
            if torch.is_grad_enabled():  # double backward: keep the graph
                grad = grad_out * torch.where(inside, q - v, q)
            else:  # in v's memory: fresh large buffers cost page faults
                grad = v.masked_fill_(~inside, 0.0).neg_().add_(q).mul_(
                    grad_out)
            if ctx.reduce_dims is None:
                grad = grad.sum().expand(step.shape)
            else:
                grad = grad.sum(dim=ctx.reduce_dims, keepdim=True)
            grad_scale = (grad * ctx.grad_scale).reshape(step.shape)
        return grad_x, grad_scale, None, None, None, None, None, None, None


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
    return _FakeQuant.apply(x, scale, tuple(h_range), int(shift),
                            tuple(l_range), rounding, variant,
                            float(grad_scale), reduce_dims)


def lsq_grad_scale(num_elements: int, q_max: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(num_elements, 1) * max(q_max, 1))
