"""The base of mmdrq's quantizers: learned scales, initialised lazily.

Owns what a learned-scale quantizer keeps besides its math (the shape of
torch.ao's ``FakeQuantizeBase``): the ``scale`` parameter with one row per
independently initialised scale, the ``initialized`` buffer, the
load hook that reads it back, readiness, and the scale's view for a tensor.
Subclasses give ``_initial_scale`` and compute in ``forward``.
"""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from .bitwidths import check_bits

# a scale never starts at 0 (an all-zero input): 0 would divide
MIN_INITIAL_SCALE = 1e-8


def _read_ready_after_load(module: 'LearnedScaleQuantizer', keys):
    module._read_ready()


class LearnedScaleQuantizer(nn.Module):
    """``scale`` of shape ``(rows, channels)`` (``(rows,)`` for scalars),
    each row initialised from the first input it quantizes.

    Args:
        bits: bit-widths, highest first.
        scale_shape: shape of ``scale``; dim 0 counts the rows.
        per_channel: whether dim 1 holds one scale per output channel
            (dim 0 of the quantized tensor).
    """

    # whether the scale is updated at each bit's own rate (ALRS's group);
    # False for a scale that quantizes at one fixed bit
    per_bit_lr = True

    def __init__(self, bits: Sequence[int], scale_shape: Sequence[int],
                 per_channel: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.per_channel = per_channel
        self.scale = nn.Parameter(torch.ones(*scale_shape))
        self.register_buffer('initialized',
                             torch.zeros(scale_shape[0], dtype=torch.bool))
        self._ready = set()  # rows known to be initialised (no device read)
        # a module-level function: a whole model pickles (torch.save)
        self.register_load_state_dict_post_hook(_read_ready_after_load)

    def _read_ready(self):
        """After a load: which rows the loaded buffer says are initialised
        (one read of the device here, none per forward)."""
        self._ready = {row for row, done in
                       enumerate(self.initialized.tolist()) if done}

    @property
    def ready(self) -> bool:
        """Every scale row initialised and known to be (no check left that
        reads the device: what ``torch.compile`` needs to trace cleanly)."""
        return len(self._ready) == self.scale.shape[0]

    def _initial_scale(self, x: torch.Tensor, bit: int) -> torch.Tensor:
        """The starting value of a row for input ``x`` at ``bit``."""
        raise NotImplementedError

    def _ensure_init(self, x: torch.Tensor, row: int, bit: int):
        """Initialise ``row`` from ``x`` at ``bit`` unless it is."""
        if row in self._ready:
            return
        if not bool(self.initialized[row]):
            with torch.no_grad():
                value = self._initial_scale(x, bit)
                value = torch.where(value > 0, value,
                                    torch.full_like(value, MIN_INITIAL_SCALE))
                # through .data: initialising one row must not invalidate
                # graphs that saved the parameter (loss_mode='sum' builds
                # every bit's graph before one backward)
                self.scale.data[row] = value.to(self.scale.dtype)
                self.initialized[row] = True
        self._ready.add(row)

    def scale_view(self, ndim: int, row: int = 0,
                   scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row ``row`` of ``scale`` (default: this quantizer's) shaped to
        broadcast over an ``ndim``-dim tensor: one scale per dim-0 channel,
        or a 1-element tensor."""
        scale = (self.scale if scale is None else scale)[row]
        if self.per_channel:
            return scale.view(-1, *([1] * (ndim - 1)))
        return scale.reshape(1)


def lsq_grad_scale(num_elements: int, q_max: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(num_elements, 1) * max(q_max, 1))
