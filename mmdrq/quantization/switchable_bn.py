"""Switchable norms: one BN (or GroupNorm / LayerNorm) per bit-width
(multi-precision training; docs/method.md, Switchable and transitional BN)."""
import copy
from typing import Optional, Sequence

from torch import nn

from mmdrq.registry import MODELS
from .bitwidths import check_bits
from .layers import BitSwitchable


@MODELS.register_module()
class SwitchableBatchNorm(BitSwitchable, nn.Module):
    """Holds a copy of a BN layer per bit and runs the one of ``self.bit``.

    Activation statistics differ between bit-widths, so each bit keeps its
    own running stats and affine parameters, all starting from the FP BN.
    The copies are plain BN modules (``bns['4']``), so code that looks for
    ``_BatchNorm`` (norm_eval, frozen stages, SyncBN conversion) still finds
    them.

    Args:
        bn: the BN layer to copy (any ``_BatchNorm``).
        bits: bit-widths, highest first.
        source: name of the quantized layer that produces this BN's input,
            when known; per-layer bit control makes the BN follow it.
    """

    def __init__(self, bn: nn.Module, bits: Sequence[int],
                 source: Optional[str] = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.bit = self.bits[0]
        self.source = source
        self.bns = nn.ModuleDict(
            {str(b): copy.deepcopy(bn) for b in self.bits})
        self._register_load_state_dict_pre_hook(self._expand_fp_keys)

    def _expand_fp_keys(self, state_dict, prefix, *args):
        """A checkpoint of the FP model holds one BN here (``prefix.weight``
        ...): give its values to every bit's copy, so FP32 checkpoints load
        into converted models."""
        for key in ('weight', 'bias', 'running_mean', 'running_var',
                    'num_batches_tracked'):
            if prefix + key in state_dict:
                value = state_dict.pop(prefix + key)
                for bit in self.bits:
                    state_dict.setdefault(f'{prefix}bns.{bit}.{key}', value)

    @property
    def num_features(self):
        return self.bns[str(self.bits[0])].num_features

    def active(self) -> nn.Module:
        """The copy ``forward`` runs now."""
        return self.bns[str(self.bit)]

    def forward(self, x, *args, **kwargs):
        """The active copy's forward, with whatever its type takes
        (mmpretrain's LayerNorm2d: ``data_format``)."""
        return self.active()(x, *args, **kwargs)

    def extra_repr(self):
        return f'bits={list(self.bits)}, bit={self.bit}, source={self.source}'


@MODELS.register_module()
class SwitchableNorm(SwitchableBatchNorm):
    """Switchable GroupNorm or LayerNorm: a copy per bit, as for BN.

    GN and LN normalise each sample by its own statistics, so only their
    affine parameters are per bit: they absorb the shift and scale that each
    bit's quantization error gives the activations (as BN's do), at 2C
    parameters per bit. State keys are the BN ones (``bns.<bit>.weight``),
    so transitional conversion and FP checkpoints treat them alike.
    """

    @property
    def num_features(self):
        return norm_channels(self.bns[str(self.bits[0])])


def norm_channels(norm: nn.Module) -> int:
    """Channels a BN, GN or LN normalises (LN: its last dimension)."""
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[-1]
    return norm.num_features
