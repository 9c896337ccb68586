"""Multi-level norms for shared detection heads (docs/lowbit.md,
Multi-level norms).

A dense head (RetinaNet, FCOS, ATSS, ...) runs the same convs over every
FPN level, so one BN mixes the statistics of all levels, and one set of
affine parameters serves them all; at low bit-widths the levels' quantized
activations differ more. AQD (Chen et al., "AQD: Towards Accurate Quantized
Object Detection", CVPR 2021) gives each level its own BN in the shared
head; here every norm of the head (switchable per bit, or plain) gets one
copy per level, so each (level, bit) has its own statistics and affine
parameters, while the convs stay shared.
"""
import copy

from torch import nn

from mmdrq.registry import MODELS

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@MODELS.register_module()
class LevelNorm(nn.Module):
    """One copy of a norm per FPN level. The head runs each norm once per
    level, in level order, so the n-th call of a forward is level n (the
    head's forward pre-hook restarts the count; the count also wraps)."""

    def __init__(self, norm: nn.Module, num_levels: int):
        super().__init__()
        self.levels = nn.ModuleList(
            copy.deepcopy(norm) for _ in range(num_levels))
        self.calls = 0
        self._register_load_state_dict_pre_hook(self._expand_keys)

    def _expand_keys(self, state_dict, prefix, *args):
        """A checkpoint without levels (FP, or trained without this option)
        gives its norm to every level."""
        inner = prefix + 'levels.'
        for key in [k for k in state_dict
                    if k.startswith(prefix) and not k.startswith(inner)]:
            value = state_dict.pop(key)
            for level in range(len(self.levels)):
                state_dict.setdefault(
                    f'{inner}{level}.{key[len(prefix):]}', value)

    def forward(self, x):
        level = self.calls % len(self.levels)
        self.calls += 1
        return self.levels[level](x)

    def extra_repr(self):
        return f'num_levels={len(self.levels)}'


def _restart_levels(head: nn.Module, args):
    for module in head.modules():
        if isinstance(module, LevelNorm):
            module.calls = 0


def to_level_norms(architecture: nn.Module) -> list:
    """Give every norm of the detector's shared dense head (``bbox_head``)
    one copy per FPN level, in place; returns conversion-table rows."""
    name = type(architecture).__name__
    head = getattr(architecture, 'bbox_head', None)
    levels = getattr(getattr(head, 'prior_generator', None), 'num_levels',
                     None)
    if head is None or levels is None or \
            getattr(architecture, 'roi_head', None) is not None:
        raise ValueError(f'multi_level_norm=True needs a single-stage mmdet '
                         f'detector whose bbox_head runs over FPN levels '
                         f'(prior_generator); {name} has none')
    from mmdrq.quantization.switchable_bn import SwitchableBatchNorm
    rows, inner = [], ()
    for child, module in list(head.named_modules()):
        # per-bit copies of a switchable norm go with it
        if child.startswith(inner) or not isinstance(
                module, NORM_TYPES + (SwitchableBatchNorm, )):
            continue
        inner = (child + '.', )
        parent_name, _, attr = child.rpartition('.')
        parent = head.get_submodule(parent_name) if parent_name else head
        setattr(parent, attr, LevelNorm(module, levels))
        rows.append((f'bbox_head.{child}', type(module).__name__,
                     f'one per FPN level ({levels})'))
    if not rows:
        raise ValueError(
            f'multi_level_norm=True: {type(head).__name__} of {name} has no '
            f'norm layers; give it one, e.g. bbox_head.norm_cfg=dict('
            f"type='GN', num_groups=32, requires_grad=True) or BN")
    head.register_forward_pre_hook(_restart_levels)
    return rows

