"""Transitional BatchNorm: one BN per (input bit, own bit) pair, for mixed
precision, where a layer's output statistics depend on its own bit and on
the bit of the layer that produced its input (docs/method.md, Switchable
and transitional BN)."""
import copy
from typing import Callable, List, Optional, Sequence

from torch import nn

from mmdrq.registry import MODELS
from .bitwidths import check_bit, check_bits
from .graph import input_producers
from .layers import BitSwitchable
from .report import ConversionRow
from .switchable_bn import SwitchableBatchNorm

_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var',
            'num_batches_tracked')


@MODELS.register_module()
class TransitionalBatchNorm(BitSwitchable, nn.Module):
    """BN per (``prev_bit``, ``bit``) pair: ``bit`` follows the layer that
    feeds this BN (``source``), ``prev_bit`` the layer that feeds that one
    (``previous``). Without a known ``previous`` it keys by ``bit`` alone,
    like switchable BN.

    Args:
        bn_per_bit: bit -> BN to start from (a switchable BN's copies).
        bits: bit-widths, highest first.
        source, previous: producer layer names (see above).
    """

    def __init__(self, bn_per_bit: dict, bits: Sequence[int],
                 source: Optional[str] = None,
                 previous: Optional[str] = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.bit = self.prev_bit = self.bits[0]
        self.source, self.previous = source, previous
        if previous is None:
            keys = {str(c): c for c in self.bits}
        else:
            keys = {f'{p}_{c}': c for p in self.bits for c in self.bits}
        self.bns = nn.ModuleDict(
            {k: copy.deepcopy(bn_per_bit[c]) for k, c in keys.items()})
        self._register_load_state_dict_pre_hook(self._expand_keys)

    def _expand_keys(self, state_dict, prefix, *args):
        """FP checkpoints (``prefix.weight``) and multi-precision ones
        (``prefix.bns.<bit>.weight``) give their BN to every pair."""
        for key in _BN_KEYS:
            fp = state_dict.pop(prefix + key, None)
            if self.previous is None:
                if fp is not None:
                    for bit in self.bits:
                        state_dict.setdefault(f'{prefix}bns.{bit}.{key}', fp)
                continue
            own = {c: state_dict.pop(f'{prefix}bns.{c}.{key}', None)
                   for c in self.bits}
            for p in self.bits:
                for c in self.bits:
                    value = own[c] if own[c] is not None else fp
                    if value is not None:
                        state_dict.setdefault(f'{prefix}bns.{p}_{c}.{key}',
                                              value)

    def set_bit(self, bit: int, prev_bit: Optional[int] = None):
        """Run at ``bit`` after a layer at ``prev_bit`` (default: ``bit``,
        one bit for the whole model)."""
        super().set_bit(bit)
        self.prev_bit = self.bit if prev_bit is None else \
            check_bit(prev_bit, self.bits, 'prev_bit')

    def active(self) -> nn.Module:
        """The copy ``forward`` runs now."""
        key = f'{self.prev_bit}_{self.bit}' if self.previous is not None \
            else str(self.bit)
        return self.bns[key]

    def forward(self, x, *args, **kwargs):
        """The active copy's forward, with whatever its type takes
        (mmpretrain's LayerNorm2d: ``data_format``)."""
        return self.active()(x, *args, **kwargs)

    def extra_repr(self):
        return (f'bits={list(self.bits)}, source={self.source}, '
                f'previous={self.previous}')


def to_transitional(model: nn.Module,
                    run_forward: Callable[[nn.Module], object]) -> List:
    """Replace every switchable BN by a transitional one, in place.

    ``run_forward(model)`` runs one forward (any input of the right shape)
    to find each BN's producers. Returns conversion-table rows; BNs whose
    input producer is unknown say that they key by their own bit.
    """
    producers = input_producers(model, run_forward)
    rows = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, SwitchableBatchNorm):
            continue
        previous = producers.get(module.source) if module.source else None
        new = TransitionalBatchNorm(
            {b: module.bns[str(b)] for b in module.bits}, module.bits,
            module.source, previous)
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        how = f'({previous}, {module.source}) pairs' if previous else \
            'own bit only: input producer unknown'
        rows.append(ConversionRow(name, 'TransitionalBatchNorm',
                                  'transitional BN', how))
    return rows
