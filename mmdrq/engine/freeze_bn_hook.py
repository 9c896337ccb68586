"""Training on the BN statistics the model is evaluated with."""
from mmengine.hooks import Hook
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.registry import HOOKS


@HOOKS.register_module()
class FreezeBNStatsHook(Hook):
    """From iteration ``begin`` on, every BN layer normalises by its running
    statistics in training too and stops updating them; its affine
    parameters still learn (all bits' copies of a switchable BN alike).

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
    """

    def __init__(self, begin: int = 0):
        if isinstance(begin, bool) or not isinstance(begin, int) or begin < 0:
            raise ValueError(f'FreezeBNStatsHook begin must be an int >= 0, '
                             f'got {begin!r}')
        self.begin = begin

    def before_train(self, runner):
        if self.begin >= runner.max_iters:
            raise ValueError(
                f'FreezeBNStatsHook begin={self.begin} is not before the end '
                f'of training (max_iters={runner.max_iters}): no iteration '
                f'would freeze the BN statistics')

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # the loop calls model.train() after every validation: set it again
        if runner.iter >= self.begin:
            for module in runner.model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
