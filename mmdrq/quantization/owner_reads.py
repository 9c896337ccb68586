"""Owners whose own code reads a quantized child's weight (BEiT's
``F.linear(x, self.qkv.weight)``): found from their source, and given the
quantized weight during their forward."""
import contextlib
import functools
import inspect
import re
from typing import Optional

from torch import nn

from .weight_layers import quantized_class


class WeightReadingOwner:
    """An owner whose code reads quantized children's weights directly
    (BEiT's ``F.linear(x, self.qkv.weight)``): during its forward those
    weights are their fake-quantized tensors. What it feeds them is not
    known here, so their inputs stay FP. ``mmdrq_weight_reads`` names the
    submodules (dotted below children: TOOD's
    ``self.reduction_conv.conv.weight``)."""
    mmdrq_weight_reads: tuple = ()

    @classmethod
    def from_owner(cls, owner: nn.Module, children) -> nn.Module:
        owner.__class__ = quantized_class(cls, type(owner))
        owner.mmdrq_weight_reads = tuple(children)
        return owner

    def forward(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for child in self.mmdrq_weight_reads:
                stack.enter_context(
                    self.get_submodule(child).quantized_parameter())
            return super().forward(*args, **kwargs)


_WEIGHT_READ = re.compile(r'self\.(\w+(?:\.\w+)*)\.weight\b')


def weight_reads(owner: nn.Module) -> list:
    """Submodules of ``owner`` that its class's methods (or a base's, short
    of torch's, MMEngine's and mmdrq's) read as ``self.<child>.weight`` or
    ``self.<child>.<grandchild>.weight``; ``init*`` methods are left out
    (they run outside a forward)."""
    found = []
    for cls in type(owner).__mro__:
        for name in _class_weight_reads(cls):
            if name not in found and _submodule(owner, name) is not None:
                found.append(name)
    return found


def _submodule(owner: nn.Module, path: str) -> Optional[nn.Module]:
    """``owner``'s submodule at the dotted ``path`` (None if absent)."""
    module = owner
    for part in path.split('.'):
        module = module._modules.get(part)
        if module is None:
            return None
    return module


@functools.lru_cache(maxsize=None)
def _class_weight_reads(cls: type) -> tuple:
    if cls.__module__.split('.')[0] in ('torch', 'mmengine', 'mmdrq',
                                        'builtins'):
        return ()
    names = []
    for attr, function in vars(cls).items():
        if 'init' in attr or not inspect.isfunction(function):
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):  # no source to read
            continue
        names += _WEIGHT_READ.findall(source)
    return tuple(dict.fromkeys(names))
