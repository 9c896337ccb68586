"""Which conv, linear and attention weights a forward really uses quantized.

The conversion table says which layers were replaced; only a forward shows
what reaches the arithmetic: a converted layer whose owner reads
``.weight`` directly (``F.linear(x, self.qkv.weight)``), a module shared
between places but converted at one of them, a packed attention projection
read by ``F.multi_head_attention_forward``, a weight standardized before
its conv. ``tracing_weight_uses`` watches every aten op of a forward (a
``TorchDispatchMode``) and follows where each tensor came from, by storage:

- a tracked weight (the ``weight`` of a conv- or linear-like module, the
  projection weights of ``nn.MultiheadAttention``, also under
  ``torch.nn.utils.parametrize``) starts as FP of itself;
- an op whose inputs are all weights, parameters, buffers or numbers
  (``w.t()``, ``torch.cat`` of q/k/v weights, ``(w - mean) / std``) gives
  an output derived from the same weights, with the same kind;
- the output of an mmdrq quantizer (``LearnedScaleQuantizer``) fed a weight
  is that weight quantized;
- an op where a weight-derived tensor meets an activation (anything not
  known as weight, parameter, buffer or number: the model's inputs, random
  draws, buffers made in the forward, and what is computed from them) is a
  use of the weight, FP or quantized. This
  is the conv, the matmul, the deformable conv's matmul inside mmcv's
  extension, whatever the op is called; its output is an activation.

Weights a forward never uses (an auxiliary head in eval mode) are listed as
unused, apart from the shares.
"""
import contextlib
import re
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .forms import is_weight_layer
from .functional import fake_quant_impl
from .layers import QuantLayer
from .learned_scale import LearnedScaleQuantizer
from .report import FP, ConversionRow, report_of

ATTENTION_WEIGHTS = ('in_proj_weight', 'q_proj_weight', 'k_proj_weight',
                     'v_proj_weight')
# outputs that keep only their input's shape, not its values (and tensors
# made from Python numbers: torch.tensor)
_SHAPE_ONLY = {'zeros_like', 'ones_like', 'empty_like', 'full_like',
               'rand_like', 'randn_like', 'new_zeros', 'new_ones',
               'new_empty', 'new_full', 'fill_', 'zero_',
               'lift_fresh', 'lift_fresh_copy'}
# data, not constants: random draws (DETR's denoising noise, a test's
# input); so are tensors made from shapes alone (zeros, empty, arange: an op
# without tensor inputs), which extension ops such as mmcv's deformable conv
# fill from their input outside the dispatcher
_RANDOM = {'rand', 'randn', 'randint', 'randperm', 'normal', 'bernoulli',
           'uniform_', 'normal_', 'bernoulli_', 'multinomial'}
ACT = 'activation'
CONST = frozenset()  # weight-free, activation-free: parameters, constants


class WeightUse(NamedTuple):
    """What a forward did with one weight: ``use`` is ``quantized``,
    ``fp``, ``mixed`` (quantized in one place, FP in another: counts as
    FP) or ``unused``; ``converted``: whether the layer is a quantized
    one."""
    layer: str
    layer_type: str
    numel: int
    use: str
    converted: bool


def tracked_weights(model: nn.Module) -> Dict[str, tuple]:
    """``{name: (module name, module, parameter)}`` of ``model``'s conv,
    linear and attention weights (a parameter shared between modules
    once)."""
    found, seen = {}, set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            names = ATTENTION_WEIGHTS
        elif is_weight_layer(module) or parametrize.is_parametrized(
                module, 'weight') and re.search('Conv|Linear',
                                                type(module).__name__):
            names = ('weight', )
        else:
            continue
        for attr in names:
            if parametrize.is_parametrized(module, attr):
                param = module.parametrizations[attr].original
            else:
                param = getattr(module, attr)
            if isinstance(param, nn.Parameter) and id(param) not in seen:
                seen.add(id(param))
                prefix = module_name + '.' if module_name else ''
                found[prefix + attr] = (module_name, module, param)
    return found


class _Provenance:
    """Status of each live storage: ``ACT``, or a frozenset of
    ``(weight name, 'fp' | 'quantized')`` (``CONST`` when empty). Unknown
    storages (the model's inputs) are activations."""

    def __init__(self):
        self._status = {}

    def get(self, tensor: torch.Tensor):
        entry = self._status.get(id(tensor.untyped_storage()))
        return ACT if entry is None else entry[1]

    def set(self, tensor: torch.Tensor, status):
        storage = tensor.untyped_storage()
        key = id(storage)

        def forget(ref, key=key):
            if self._status.get(key, (None, ))[0] is ref:
                del self._status[key]

        self._status[key] = (weakref.ref(storage, forget), status)


class _WeightUseMode(TorchDispatchMode):

    def __init__(self, provenance: _Provenance, uses: Dict[str, set]):
        super().__init__()
        self.provenance = provenance
        self.uses = uses

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)]
        name = func.overloadpacket.__name__
        if name in _SHAPE_ONLY:
            status = CONST
        elif name in _RANDOM or not inputs:
            status = ACT
        elif name == 'copy_':  # the destination holds the source's values
            status = self.provenance.get(inputs[1])
        else:
            statuses = [self.provenance.get(t) for t in inputs]
            if ACT in statuses:
                status = ACT
                for weights in statuses:
                    if weights != ACT:
                        for weight, kind in weights:
                            self.uses[weight].add(kind)
            else:
                status = frozenset().union(*statuses)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.provenance.set(tensor, status)
        return out


@dataclass
class WeightUses:
    """What a forward did with each tracked weight: ``weights`` maps its
    name to a ``WeightUse``; ``layers`` is the conversion report's row of
    each layer (when the model was converted)."""
    weights: Dict[str, WeightUse] = field(default_factory=dict)
    layers: Dict[str, ConversionRow] = field(default_factory=dict)

    def kept_fp(self, name: str) -> bool:
        """Whether the defaults keep ``name``'s layer FP on purpose (the
        first and the prediction layers, ``skip_first_last``)."""
        row = self.layers.get(self.weights[name].layer)
        return row is not None and row.by_default

    def numel(self, uses=('quantized', 'fp', 'mixed'), kept=None) -> int:
        """Parameters of the weights whose use is in ``uses``; ``kept``
        True / False: only those the defaults keep FP / the others."""
        return sum(w.numel for name, w in self.weights.items()
                   if w.use in uses and
                   (kept is None or self.kept_fp(name) == kept))

    def share(self, uses, kept=None) -> float:
        """Share of the used weights' parameters selected as in ``numel``."""
        total = self.numel()
        return self.numel(uses, kept) / total if total else 0.0

    def fp_layers(self, kept: bool = False) -> Dict[str, str]:
        """``{weight: reason}`` of the weights used FP (or mixed) that the
        defaults do not keep FP (with ``kept``: those they keep)."""
        return {name: self.reason(name) for name, w in self.weights.items()
                if w.use in ('fp', 'mixed') and self.kept_fp(name) == kept}

    def reason(self, name: str) -> str:
        """Why ``name`` runs FP, in the conversion table's words where it
        has them."""
        weight = self.weights[name]
        row = self.layers.get(weight.layer)
        if weight.use == 'mixed':
            return 'read quantized in one place and FP in another ' \
                '(a module shared between places, converted once)'
        if row is not None and row.decision == FP:
            return row.detail
        if weight.converted:
            return 'converted, but the forward reads the weight directly'
        return f'not converted ({weight.layer_type})'

    def unused(self) -> List[str]:
        return [n for n, w in self.weights.items() if w.use == 'unused']

    def summary(self) -> str:
        """One line: the shares, then each other FP weight and why."""
        fp = ('fp', 'mixed')
        line = (f'{self.share(("quantized", )):.1%} quantized, '
                f'{self.share(fp, kept=True):.1%} FP kept by '
                f'skip_first_last, {self.share(fp, kept=False):.1%} other FP')
        others = self.fp_layers()
        if others:
            line += ': ' + ', '.join(f'{n} ({r})' for n, r in others.items())
        return line


@contextlib.contextmanager
def tracing_weight_uses(model: nn.Module):
    """Within the block, watch what every forward of ``model`` does with its
    conv, linear and attention weights; the yielded ``WeightUses`` is filled
    when the block ends. Fake quantization runs on plain torch ops here (the
    fused kernels are compiled graphs a dispatch mode cannot look into), and
    quantized layers' cached eval weights are dropped first, so each is
    recomputed under watch."""
    weights = tracked_weights(model)
    provenance = _Provenance()
    for tensor in list(model.parameters()) + list(model.buffers()):
        provenance.set(tensor, CONST)
    for name, (_, _, param) in weights.items():
        provenance.set(param, frozenset([(name, 'fp')]))
    uses = {name: set() for name in weights}
    for module in model.modules():
        if isinstance(module, QuantLayer):
            module.train(module.training)  # drops the cached weight

    def quantized_output(module, args, output):
        if not isinstance(output, torch.Tensor):
            return
        status = provenance.get(output)
        if status in (ACT, CONST) or any(
                isinstance(a, torch.Tensor) and a.untyped_storage() is
                output.untyped_storage() for a in args):
            return  # an activation, or the weight passed through as is
        provenance.set(output, frozenset((w, 'quantized') for w, _ in status))

    handles = [m.register_forward_hook(quantized_output)
               for m in model.modules()
               if isinstance(m, LearnedScaleQuantizer)]
    result = WeightUses(layers={row.layer: row for row in report_of(model)})
    try:
        with fake_quant_impl('torch'), _WeightUseMode(provenance, uses):
            yield result
    finally:
        for handle in handles:
            handle.remove()
    for name, (layer, module, param) in weights.items():
        kinds = uses[name]
        use = 'mixed' if len(kinds) == 2 else kinds.pop() if kinds \
            else 'unused'
        result.weights[name] = WeightUse(
            layer, type(module).__name__, param.numel(), use,
            isinstance(module, QuantLayer))
