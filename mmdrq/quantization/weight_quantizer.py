"""The Double Rounding weight quantizer: one learned scale shared by all bits
(formulas, options, defaults: docs/method.md, Weight quantizer)."""
import contextlib
from typing import Sequence

import torch
from torch import nn

from mmdrq.registry import MODELS
from mmdrq.utils.checks import check_choice, check_flag
from .bitwidths import check_bit, check_bits, signed_range
from .functional import RESIDUALS, ROUNDINGS, fake_quant_bits, quantize_int
from .learned_scale import LearnedScaleQuantizer, lsq_grad_scale

VARIANTS = ('double_rounding', 'floor', 'unshared')
STEP_SHIFTS = ('off', 'mse')
# the candidates of a lower bit's extra shift k (its step s * 2**(h-l+k)):
# a finer step at most four times finer than the plain one
STEP_SHIFT_CHOICES = (-2, -1, 0)
SCALE_GRADS = ('lsq', 'exact')
SCALE_GRAD_REDUCES = ('channel', 'tensor')


@MODELS.register_module()
class DoubleRoundingQuantizer(LearnedScaleQuantizer):
    """Fake-quantizes a weight at any bit of ``bits`` from one stored grid.

    The stored integers are ``q_h = clip(round(W / s), h)`` with h =
    ``bits[0]``; bit l re-rounds them by ``d = h - l`` bits, so the scale of
    bit l is exactly ``s * 2**d`` and no FP copy is needed to switch.

    Args:
        bits: bit-widths, highest first.
        num_channels: output channels (dim 0 of the weight); None means
            one per-tensor scale.
        per_channel: one scale per output channel (default) or, if False,
            one for the whole tensor.
        variant: ``double_rounding`` (the method), ``floor`` (baseline:
            right-shift truncation of q_h) or ``unshared`` (baseline: an
            independent FP scale per bit, plain LSQ; keeps FP weights).
        rounding: second rounding's tie rule, ``half_even`` (torch.round) or
            ``half_up`` (the integer shift ``(q + 2**(d-1)) >> d``).
        scale_grad: ``lsq`` (the authors' code: the 2**d chain-rule factor
            dropped) or ``exact``.
        scale_grad_reduce: ``channel`` sums the scale gradient per channel;
            ``tensor`` gives every channel the whole-tensor sum (the
            authors' code).
        scale_grad_residual: the integer in the scale gradient's residual
            ``int - v`` (v = W / (s * 2**d)) inside the range at a lower
            bit: ``first_rounding`` (round(v), the authors' code and the
            spec; the default, 0.9 points better at w2a2 on the digits
            benchmark; v rounded once by ``rounding``'s tie rule, and
            floor(v) for ``floor``) or ``double_rounded`` (the target's
            q_l, the value the forward uses). They differ where the two roundings do not
            commute (12% of in-range weights at w6 of {8,6,4,2}), and the
            sign can flip; at the stored bit they agree.
        step_shift: ``off`` (the paper: bit l's step is ``s * 2**(h-l)``)
            or ``mse``: each lower bit gets a per-layer integer ``k`` in
            ``STEP_SHIFT_CHOICES`` (buffer ``step_shifts``), its step
            ``s * 2**(h-l+k)`` and integers ``clip(round(q_h / 2**(h-l+k)))``
            still derived from the stored ones by a shift; ``k`` is chosen
            at each training forward of that bit as the one of least weight
            quantization error (docs/lowbit.md, Per-bit step shifts).
    """

    def __init__(self,
                 bits: Sequence[int],
                 num_channels=None,
                 per_channel: bool = True,
                 variant: str = 'double_rounding',
                 rounding: str = 'half_even',
                 scale_grad: str = 'lsq',
                 scale_grad_reduce: str = 'channel',
                 scale_grad_residual: str = 'first_rounding',
                 step_shift: str = 'off'):
        bits = check_bits(bits)
        check_choice('variant', variant, VARIANTS)
        check_choice('rounding', rounding, ROUNDINGS)
        check_choice('scale_grad', scale_grad, SCALE_GRADS)
        check_choice('scale_grad_reduce', scale_grad_reduce,
                     SCALE_GRAD_REDUCES)
        check_choice('scale_grad_residual', scale_grad_residual, RESIDUALS)
        check_choice('step_shift', step_shift, STEP_SHIFTS)
        if step_shift != 'off' and variant != 'double_rounding':
            raise ValueError(f"step_shift={step_shift!r} needs variant="
                             f"'double_rounding', got {variant!r}")
        per_channel = check_flag('per_channel', per_channel) and \
            num_channels is not None
        num_scales = len(bits) if variant == 'unshared' else 1
        super().__init__(bits, (num_scales, num_channels if per_channel
                                else 1), per_channel)
        self.variant = variant
        self.rounding = rounding
        self.scale_grad = scale_grad
        self.scale_grad_reduce = scale_grad_reduce
        self.scale_grad_residual = scale_grad_residual
        self.step_shift = step_shift
        if step_shift != 'off':
            # k per bit (0 at the stored bit), saved with the scales
            self.register_buffer('step_shifts',
                                 torch.zeros(len(bits), dtype=torch.int64))
        self._shared = None  # every bit's output, under shared_rounding

    @property
    def stored_bit(self) -> int:
        return self.bits[0]

    def extra_repr(self):
        return (f'bits={list(self.bits)}, variant={self.variant}, '
                f'rounding={self.rounding}, per_channel={self.per_channel}'
                + (f', step_shift={self.step_shift}'
                   if self.step_shift != 'off' else ''))

    @property
    def sharing(self) -> bool:
        """Whether forwards hand out outputs shared between bits (inside
        ``shared_rounding``)."""
        return self._shared is not None

    def _row(self, bit: int) -> int:
        return self.bits.index(bit) if self.variant == 'unshared' else 0

    def _initial_scale(self, weight: torch.Tensor, bit: int) -> torch.Tensor:
        """Per channel ``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2**(b-1)``;
        per tensor ``2 mean|W| / sqrt(Qp)`` (LSQ's rule)."""
        w = weight.detach().float()
        if self.per_channel:
            flat = w.reshape(w.shape[0], -1)
            mu = flat.mean(dim=1)
            sigma = flat.std(dim=1, unbiased=False)
            bound = torch.maximum((mu - 3 * sigma).abs(),
                                  (mu + 3 * sigma).abs())
            return bound / 2**(bit - 1)
        value = 2 * w.abs().mean() / (2**(bit - 1) - 1)**0.5
        return value.reshape(1)

    def _initialised_row(self, weight: torch.Tensor, bit: int) -> int:
        """The scale row of ``bit``, initialised (the shared row from the
        stored bit)."""
        row = self._row(bit)
        init_bit = bit if self.variant == 'unshared' else self.bits[0]
        self._ensure_init(weight, row, init_bit)
        return row

    def _bit_grid(self, bit: int):
        """(stored range, shift, target range) of ``bit`` for this variant."""
        check_bit(bit, self.bits)
        if self.variant == 'unshared':
            return signed_range(bit), 0, signed_range(bit)
        return signed_range(self.bits[0]), self.shift(bit), signed_range(bit)

    def shift(self, bit: int) -> int:
        """How many bits ``bit``'s integers are shifted down from the
        stored ones: ``h - l``, plus the bit's ``k`` with ``step_shift``."""
        shift = self.bits[0] - bit
        if self.step_shift != 'off':
            shift += int(self.step_shifts[self.bits.index(bit)])
        return shift

    @torch.no_grad()
    def _choose_step_shifts(self, weight: torch.Tensor, bits):
        """Each lower bit's ``k``: the candidate whose dequantised weight
        is closest to ``weight`` (squared error, float64)."""
        scale = self.scale_view(weight.dim(), 0).double()
        w = weight.detach().double()
        h_range, h = signed_range(self.bits[0]), self.bits[0]
        for bit in bits:
            if bit == h:
                continue
            errors = {}
            for k in STEP_SHIFT_CHOICES:
                shift = h - bit + k
                if shift < 0:
                    continue
                q = quantize_int(w, scale, h_range, shift, signed_range(bit),
                                 self.rounding, 'double_rounding')
                errors[k] = float((q * scale * 2.0**shift - w).square().sum())
            self.step_shifts[self.bits.index(bit)] = min(errors,
                                                         key=errors.get)

    def forward(self, weight: torch.Tensor, bit: int) -> torch.Tensor:
        """Dequantised weight of ``bit``: ``q_l * s * 2**(h - l)``."""
        if not torch.compiler.is_compiling() and self._shared is not None \
                and torch.is_grad_enabled():
            return self._shared_output(weight, bit)
        return self._fake_quant(weight, [bit])[0]

    def _fake_quant(self, weight: torch.Tensor, bits) -> tuple:
        """Dequantised weights of ``bits`` (one scale row between them)."""
        rows = {self._initialised_row(weight, bit) for bit in bits}
        if len(rows) != 1:
            raise ValueError(f'bits {list(bits)} have scales of their own '
                             f'(variant={self.variant!r}): one at a time')
        scale = self.scale_view(weight.dim(), rows.pop())
        if self.step_shift == 'mse' and self.training:
            self._choose_step_shifts(weight, bits)
        per_scale = weight.numel() // scale.numel()
        targets = []
        for bit in bits:
            h_range, shift, l_range = self._bit_grid(bit)
            grad_scale = lsq_grad_scale(per_scale, l_range[1])
            if self.scale_grad == 'exact':
                grad_scale *= 2.0**shift
            targets.append((shift, l_range, grad_scale))
        reduce_dims = None
        if self.per_channel and self.scale_grad_reduce == 'channel':
            reduce_dims = tuple(range(1, weight.dim()))
        elif not self.per_channel:
            reduce_dims = tuple(range(weight.dim()))
        variant = 'floor' if self.variant == 'floor' else 'double_rounding'
        return fake_quant_bits(weight, scale, h_range, targets, self.rounding,
                               variant, reduce_dims, self.scale_grad_residual)

    def _shared_output(self, weight: torch.Tensor, bit: int) -> torch.Tensor:
        """``bit``'s output from one call for every bit, made at the first
        forward under ``shared_rounding`` and kept while the weight and
        the scale are unchanged (their version counters say so; writes
        through ``.data`` bypass them, as in ``quantized_weight``)."""
        self._bit_grid(bit)  # the usual error for a bit not in ``bits``
        key = (weight.data_ptr(), weight._version, self.scale._version)
        if self._shared.get('key') != key:
            outputs = dict(zip(self.bits, self._fake_quant(weight, self.bits)))
            self._shared = dict(outputs=outputs, key=key)
        return self._shared['outputs'][bit]

    @torch.no_grad()
    def integers(self, weight: torch.Tensor, bit=None) -> torch.Tensor:
        """The integers of ``bit`` (default: the stored q_h) as int32,
        rounded in the precision of the forward (float64 for a float64
        model), so they are the forward's integers."""
        bit = self.bits[0] if bit is None else bit
        h_range, shift, l_range = self._bit_grid(bit)
        row = self._initialised_row(weight, bit)
        variant = 'floor' if self.variant == 'floor' else 'double_rounding'
        q = quantize_int(weight, self.scale_view(weight.dim(), row), h_range,
                         shift, l_range, self.rounding, variant)
        return q.to(torch.int32)


@contextlib.contextmanager
def shared_rounding(model: nn.Module):
    """Within the block, each Double Rounding weight quantizer of ``model``
    computes every bit's weight with one first rounding, at its first
    training forward, and hands each bit its tensor; the backward is one
    pass per weight for all bits. For several bits' forwards before one
    backward (a summed loss), while the weights do not change. The
    ``unshared`` baseline (a scale per bit) and compiled graphs (Inductor
    fuses per graph) keep computing per call."""
    quantizers = [m for m in model.modules()
                  if isinstance(m, DoubleRoundingQuantizer)
                  and m.variant != 'unshared']
    outer = [quantizer._shared for quantizer in quantizers]
    for quantizer in quantizers:
        if quantizer._shared is None:
            quantizer._shared = {}
    try:
        yield
    finally:
        for quantizer, state in zip(quantizers, outer):
            quantizer._shared = state
