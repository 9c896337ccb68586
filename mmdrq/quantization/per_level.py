"""One copy of a module per FPN level, for the shared heads of dense
detectors (docs/lowbit.md, Multi-level norms and activation scales).

A dense head (RetinaNet, FCOS, ATSS, ...) runs the same layers over every
FPN level, in level order, once per level. ``PerLevel`` gives the n-th call
of a head forward to its n-th copy; the head's forward pre-hook
(``restart_levels_each_forward``) restarts the count, which also wraps.
"""
import copy

from torch import nn


class PerLevel(nn.Module):
    """``levels[n]`` answers the n-th call since the head's forward began.
    A checkpoint without levels (FP, or trained without them) gives its
    module's state to every level."""

    def __init__(self, module: nn.Module, num_levels: int):
        super().__init__()
        self.levels = nn.ModuleList(
            copy.deepcopy(module) for _ in range(num_levels))
        self.calls = 0
        self.last_level = 0
        self._register_load_state_dict_pre_hook(self._expand_keys)

    def _expand_keys(self, state_dict, prefix, *args):
        inner = prefix + 'levels.'
        for key in [k for k in state_dict
                    if k.startswith(prefix) and not k.startswith(inner)]:
            value = state_dict.pop(key)
            for level in range(len(self.levels)):
                state_dict.setdefault(
                    f'{inner}{level}.{key[len(prefix):]}', value)

    @property
    def last(self) -> nn.Module:
        """The copy that answered the latest call (what autograd's saved
        recipes must recompute with, not the next level's)."""
        return self.levels[self.last_level]

    def forward(self, *args):
        self.last_level = self.calls % len(self.levels)
        self.calls += 1
        return self.last(*args)

    def extra_repr(self):
        return f'num_levels={len(self.levels)}'


def last_called(module: nn.Module) -> nn.Module:
    """``module``, or the copy a ``PerLevel`` gave its latest call to."""
    return module.last if isinstance(module, PerLevel) else module


def _restart(head: nn.Module, args):
    for module in head._mmdrq_per_level:
        module.calls = 0


def restart_levels_each_forward(head: nn.Module, modules: list):
    """Restart the level count of ``modules`` (``PerLevel`` modules of
    ``head``) at each head forward: one pre-hook per head, over the list of
    its ``PerLevel`` modules, not a search of the head at every forward."""
    if not hasattr(head, '_mmdrq_per_level'):
        head._mmdrq_per_level = []
        head.register_forward_pre_hook(_restart)
    head._mmdrq_per_level.extend(modules)


# why ONNX export and deploy numerics refuse a layer whose input quantizer
# is a PerLevel
EXPORT_REFUSAL = (
    'its input scales are per FPN level (multi_level_act_scales=True): the '
    'shared layer runs at a scale per level, which the export does not '
    'express; train without multi_level_act_scales to export')
