"""Per-layer costs of a converted model: MACs per image and weight counts,
and the budgets they give a SubNet (average bits, BitOps, bytes)."""
import contextlib
from typing import Callable, Dict, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mmdrq.quantization.graph import probe_forward
from mmdrq.quantization.layers import owner_weight_reads, quantized_layers

BUDGET_KINDS = ('avg_bits', 'bitops', 'size')


def layer_costs(model: nn.Module,
                inputs: Union[torch.Tensor, Callable[[nn.Module], object]]
                ) -> Dict[str, dict]:
    """``{layer: dict(macs=..., params=...)}`` for every quantized layer,
    MACs per image of one forward (``model(inputs)``, or ``inputs(model)``
    when it is a callable), which leaves the model's state as it was; a
    layer run several times (shared detection heads) sums its calls;
    ``act_bit`` only where the layer's input bit is fixed
    (``ActQuantizer(fixed_bit=...)``), not the layer's."""
    layers = quantized_layers(model)
    costs = {n: dict(macs=0, params=m.float_weight.numel())
             for n, m in layers.items()}
    for name, layer in layers.items():
        fixed = getattr(layer.act_quantizer, 'fixed_bit', None)
        if fixed:
            costs[name]['act_bit'] = fixed
    reads = _OwnerReads(model, layers, costs)
    handles = []
    for name, layer in layers.items():
        def hook(module, args, kwargs, out, name=name):
            reads.depth -= 1
            costs[name]['macs'] += module.macs(args, kwargs, out)
        handles.append(layer.register_forward_pre_hook(reads.enter_layer))
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with probe_forward(model), torch.no_grad(), \
                reads if reads.read else contextlib.nullcontext():
            inputs(model) if callable(inputs) else model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return costs


class _OwnerReads(TorchFunctionMode):
    """Counts the weights that owners read themselves
    (``WeightReadingOwner``: BEiT's ``F.linear(x, self.qkv.weight)``): a
    linear or conv op outside any quantized layer's own forward whose
    weight is such a layer's swapped-in quantized weight counts as that
    layer's call. Other uses of a read weight (TOOD reshapes it into a
    bmm) are not counted."""
    OPS = (F.linear, F.conv1d, F.conv2d, F.conv3d)

    def __init__(self, model, layers, costs):
        super().__init__()
        self.depth, self.costs = 0, costs
        # layer name -> layer, for every owner's reads
        self.read = {name: layers[name] for name in owner_weight_reads(model)}

    def enter_layer(self, *args):
        self.depth += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth or func not in self.OPS:
            return out
        x = args[0] if args else kwargs.get('input')
        weight = args[1] if len(args) > 1 else kwargs.get('weight')
        for name, layer in self.read.items():
            if weight is layer._parameters[layer.weight_name]:
                batch = x.shape[0] if x.dim() > 1 else 1
                self.costs[name]['macs'] += \
                    out.numel() // batch * weight[0].numel()
        return out


def fp_bytes(model: nn.Module) -> int:
    """Bytes of everything stored as it is: parameters and persistent
    buffers other than the quantized layers' weights."""
    quantized = {id(m.float_weight) for m in quantized_layers(model).values()}
    tensors = [p for p in model.parameters() if id(p) not in quantized]
    tensors += list(model.state_dict(keep_vars=True).values())
    seen, total = set(), 0
    for t in tensors:
        if id(t) in seen or id(t) in quantized:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def average_bits(layer_bits: Dict[str, int]) -> float:
    """Plain mean over layers (the paper's average bit-width)."""
    return sum(layer_bits.values()) / len(layer_bits)


def bitops(layer_bits: Dict[str, int], costs: Dict[str, dict]) -> int:
    """sum MACs * w-bits * a-bits; a layer's bit applies to both unless
    its input's bit is fixed."""
    return sum(costs[n]['macs'] * b * (costs[n].get('act_bit') or b)
               for n, b in layer_bits.items())


def model_size_bytes(layer_bits: Dict[str, int], costs: Dict[str, dict],
                     fp: float = 0) -> float:
    """Quantized weights at their bits plus the FP bytes ``fp``."""
    return sum(costs[n]['params'] * b / 8
               for n, b in layer_bits.items()) + fp


def subnet_cost(kind: str, layer_bits: Dict[str, int],
                costs: Dict[str, dict], fp: float = 0) -> float:
    """A SubNet's budget of ``kind``: ``avg_bits``, ``bitops`` or ``size``
    (bytes, with the FP bytes ``fp``)."""
    if kind == 'avg_bits':
        return average_bits(layer_bits)
    if kind == 'bitops':
        return bitops(layer_bits, costs)
    if kind == 'size':
        return model_size_bytes(layer_bits, costs, fp)
    raise ValueError(f'budget kind {kind!r} is unknown; valid kinds: '
                     f'{list(BUDGET_KINDS)}')
