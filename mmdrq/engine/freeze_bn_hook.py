"""Training on the BN statistics the model is evaluated with."""
from typing import Dict, Optional

from mmengine.hooks import Hook
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.quantization.bitwidths import check_bit
from mmdrq.quantization.layers import BitSwitchable
from mmdrq.registry import HOOKS
from mmdrq.utils.checks import check_int


def _check_begin(value, key: str) -> int:
    return check_int(f'FreezeBNStatsHook {key}', value)


def bn_copy_bits(model: nn.Module) -> Dict[nn.Module, int]:
    """The bit of every per-bit BN copy of ``model``: switchable BN's
    ``bns['4']`` and transitional BN's ``bns['8_4']`` run at bit 4."""
    return {bn: int(key.rpartition('_')[2])
            for module in model.modules()
            if isinstance(module, BitSwitchable) and hasattr(module, 'bns')
            for key, bn in module.bns.items() if isinstance(bn, _BatchNorm)}


@HOOKS.register_module()
class FreezeBNStatsHook(Hook):
    """From iteration ``begin`` on, every BN layer normalises by its running
    statistics in training too and stops updating them; its affine
    parameters still learn.

    With small batches of dissimilar images, a BN's running statistics are a
    noisy average of the last few batches', while training saw each batch's
    own: the network is then evaluated on statistics it never trained with.
    On the low-bit benchmark's FCN, 100 more iterations at learning rate 0
    (only the statistics move) took the same FP32 weights from 79.6 to 75.0
    mIoU (docs/lowbit.md). Frozen statistics remove that gap, in FP32 (the
    end of training) as in QAT, where Fully Quantized Network (Li et al.,
    CVPR 2019) freezes them for the same reason, as ``torch.ao``'s QAT
    (``freeze_bn_stats``) does.

    Args:
        begin: the first training iteration (``runner.iter``, counted from
            0) with frozen statistics.
        bit_begin: ``{bit: iteration}``, another ``begin`` for the BN copies
            of these bits of a QAT model (switchable or transitional BN):
            the FP32 statistics suit the high bits from the start, while the
            lowest bit's activations move away from them.
    """

    def __init__(self, begin: int = 0, bit_begin: Optional[dict] = None):
        self.begin = _check_begin(begin, 'begin')
        if bit_begin is not None and not isinstance(bit_begin, dict):
            raise ValueError(f'FreezeBNStatsHook bit_begin must be a dict '
                             f'{{bit: iteration}}, got {bit_begin!r}')
        # digit strings, as --cfg-options gives keys
        self.bit_begin = {
            int(bit) if isinstance(bit, str) and bit.isdigit() else bit:
            _check_begin(it, f'bit_begin[{bit!r}]')
            for bit, it in (bit_begin or {}).items()}
        self._begins = []  # (BN layer, its first frozen iteration)

    def before_train(self, runner):
        bits = bn_copy_bits(runner.model)
        if self.bit_begin and not bits:
            raise ValueError(
                f'FreezeBNStatsHook bit_begin={self.bit_begin} needs per-bit '
                f'BN copies (a QAT model with switchable BN); '
                f'{type(runner.model).__name__} has none')
        for bit in self.bit_begin:
            check_bit(bit, sorted(set(bits.values()), reverse=True),
                      'FreezeBNStatsHook bit_begin key')
        self._begins = [
            (m, self.bit_begin.get(bits.get(m), self.begin))
            for m in runner.model.modules() if isinstance(m, _BatchNorm)]
        for key, begin in [('begin', self.begin)] + [
                (f'bit_begin[{b}]', it) for b, it in self.bit_begin.items()]:
            if begin >= runner.max_iters:
                raise ValueError(
                    f'FreezeBNStatsHook {key}={begin} is not before the end '
                    f'of training (max_iters={runner.max_iters}): no '
                    f'iteration would freeze the BN statistics')

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # the loop calls model.train() after every validation: set it again
        for module, begin in self._begins:
            if runner.iter >= begin:
                module.eval()
