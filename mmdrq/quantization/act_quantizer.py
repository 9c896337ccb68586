"""Per-bit activation quantizer: one learned scalar scale per bit-width
(docs/method.md, Activation quantizer)."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from mmdrq.registry import MODELS
from mmdrq.utils.checks import check_choice
from .bitwidths import check_bit, check_bits, signed_range, unsigned_range
from .functional import fake_quant
from .learned_scale import (MIN_INITIAL_SCALE, LearnedScaleQuantizer,
                            lsq_grad_scale)

_MAX_INIT_SAMPLES = 1 << 20
INIT_METHODS = ('percentile', 'mse')
# the MSE init's candidate clipping values: k / _MSE_STEPS of the input's
# largest magnitude, k = 1.._MSE_STEPS, each tried on at most
# _MAX_MSE_SAMPLES of the input
_MSE_STEPS = 100
_MAX_MSE_SAMPLES = 1 << 16


def _strided_sample(flat: torch.Tensor, limit: int) -> torch.Tensor:
    """Every n-th element of ``flat`` so at most ``limit`` remain."""
    if flat.numel() > limit:
        flat = flat[::flat.numel() // limit + 1]
    return flat


def mse_scale(flat: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The scale among ``max|x| * k / (_MSE_STEPS * hi)``, k = 1..steps,
    whose quantization ``clamp(round(x / s), lo, hi) * s`` (round half to
    even) has the least mean squared error on ``flat`` (the first on ties).
    At 2 bits the percentile's clipping leaves most values in the lowest
    step; LSQ+ (Bhalgat et al., CVPR-W 2020) initialises by this MSE."""
    flat = _strided_sample(flat, _MAX_MSE_SAMPLES)
    largest = flat.abs().max()
    steps = torch.arange(1, _MSE_STEPS + 1, dtype=flat.dtype,
                         device=flat.device)
    scales = largest * steps / (_MSE_STEPS * hi)
    scales = torch.where(scales > 0, scales,
                         torch.full_like(scales, MIN_INITIAL_SCALE))
    s = scales[:, None]
    error = (torch.clamp(torch.round(flat / s), lo, hi) * s - flat).square()
    return scales[error.mean(dim=1).argmin()]


@MODELS.register_module()
class ActQuantizer(LearnedScaleQuantizer):
    """Fake-quantizes activations, unsigned after ReLU or signed otherwise.

    Unlike weights, activations are not stored, so every bit gets its own
    scale (a scalar: cheap), initialised at that bit's first forward from the
    input (averaged over ranks under DDP): its ``init_percentile`` over the
    bit's largest integer, or the scale of least quantization MSE
    (``init_method='mse'``, ``mse_scale``).

    ``fixed_bit`` quantizes at that one bit whatever bit the layer runs at
    (one scale): weights switch, activations stay, e.g. at 8 bits, the
    integer-activation form a language model deploys (docs/language_model.md).

    Args:
        bits: bit-widths of the layer, highest first.
        signed: True, False, or ``'auto'``: decide at the first forward from
            whether the input has negative values, then keep it.
        init_percentile: upper percentile for the init (lower one is
            ``100 - init_percentile`` for signed inputs).
        init_method: ``'percentile'`` or ``'mse'``.
        fixed_bit: None (the layer's bit) or the one bit, 2..16.
    """

    def __init__(self,
                 bits: Sequence[int],
                 signed: Union[bool, str] = 'auto',
                 init_percentile: float = 99.9,
                 init_method: str = 'percentile',
                 fixed_bit: Optional[int] = None):
        if fixed_bit is not None:
            check_bits([fixed_bit], key='act_quantizer.fixed_bit')
        super().__init__(bits, (1 if fixed_bit else len(check_bits(bits)), ))
        self.fixed_bit = fixed_bit
        self.per_bit_lr = fixed_bit is None  # one bit's scale, not eta_b's
        if signed not in (True, False, 'auto'):
            raise ValueError(
                f"signed must be True, False or 'auto', got {signed!r}")
        if not 50.0 < init_percentile <= 100.0:
            raise ValueError(
                f'init_percentile must lie in (50, 100], got {init_percentile}')
        check_choice('init_method', init_method, INIT_METHODS)
        self.init_percentile = init_percentile
        self.init_method = init_method
        # -1: undecided ('auto' before the first forward), 0 unsigned, 1 signed
        sign = -1 if signed == 'auto' else int(signed)
        self.register_buffer('signed', torch.tensor(sign, dtype=torch.int8))
        self._signed_py = None

    def _read_ready(self):
        """After a load: also the sign as the loaded buffer says."""
        super()._read_ready()
        sign = int(self.signed)
        self._signed_py = None if sign < 0 else bool(sign)

    def extra_repr(self):
        fixed = f', fixed_bit={self.fixed_bit}' if self.fixed_bit else ''
        return f'bits={list(self.bits)}, signed={int(self.signed)}{fixed}'

    def grid(self, bit: int) -> Tuple[int, int]:
        """(bit the input is quantized at, its scale row) when the layer
        runs at ``bit``."""
        check_bit(bit, self.bits)
        if self.fixed_bit:
            return self.fixed_bit, 0
        return bit, self.bits.index(bit)

    @property
    def ready(self) -> bool:
        """Sign decided and every bit's scale initialised and known to be."""
        return self._signed_py is not None and super().ready

    def _range(self, bit):
        return signed_range(bit) if self._signed_py else unsigned_range(bit)

    def _initial_scale(self, x: torch.Tensor, bit: int) -> torch.Tensor:
        flat = _strided_sample(x.detach().float().flatten(),
                               _MAX_INIT_SAMPLES)
        if self.init_method == 'mse':
            value = mse_scale(flat, *self._range(bit))
        else:
            p = self.init_percentile / 100.0
            q = torch.quantile(flat, torch.tensor([1.0 - p, p],
                                                  device=flat.device))
            if self._signed_py:
                value = q.abs().max() / signed_range(bit)[1]
            else:
                value = q[1].clamp_min(0) / unsigned_range(bit)[1]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return value

    def forward(self, x: torch.Tensor, bit: int) -> torch.Tensor:
        bit, index = self.grid(bit)
        if self._signed_py is None:
            sign = int(self.signed)
            if sign < 0:
                negative = (x.detach() < 0).any().to(torch.int32)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(negative, op=dist.ReduceOp.MAX)
                sign = int(negative)
                self.signed.fill_(sign)
            self._signed_py = bool(sign)
        self._ensure_init(x, index, bit)
        lo, hi = self._range(bit)
        grad_scale = lsq_grad_scale(x[0].numel() if x.dim() > 1 else
                                    x.numel(), hi)
        return fake_quant(x, self.scale_view(x.dim(), index), (lo, hi), 0,
                          (lo, hi), 'half_even', 'double_rounding',
                          grad_scale, None)
