"""ONNX forms of the layers quantized in place
(``mmdrq.quantization.weight_layers``): Conv1d/3d, adaptive-padding and
Trident convs, transposed convs, weight-standardized and normed layers,
multi-head attention and mmcv's deformable convs.

The exporter's float skeleton holds a stand-in for each: a float module
whose op reads a named weight initializer (``model.<layer>.weight``, or
``model.<layer>.q_proj.weight`` for attention's packed projections). Each
bit then replaces that initializer by the bit's integers (the stored INT-h
integers of the weight the layer quantizes, after the second rounding) into
a per-output-channel DequantizeLinear, and puts the layer's input through
the same Q/(Clip)/DQ as a QConv2d's.
"""
import sys
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from mmdrq.quantization.integers import container_integers, second_rounding_mode
from mmdrq.quantization.layers import QConv2d, QLinear, QuantLayer
from mmdrq.quantization.per_level import EXPORT_REFUSAL, PerLevel
from mmdrq.quantization.attention import MultiheadAttentionLayer
from mmdrq.quantization.forms import form_of
from mmdrq.quantization.weight_layers import (ConvAWSLayer, ConvWSLayer,
                                              DeformConvPackLayer,
                                              EmbeddingLayer,
                                              ModulatedDeformConvPackLayer,
                                              NormedLayer,
                                              SwappedWeightLayer,
                                              TransposedConvLayer)

PREFIX = 'model.'
# ops whose input 1 is a layer's weight; the bias input of each
BIAS_INPUT = {'Conv': 2, 'ConvTranspose': 2, 'Gemm': 2, 'DeformConv': 3}
PROJECTIONS = (('q_proj', 'act_quantizer'), ('k_proj', 'key_act_quantizer'),
               ('v_proj', 'value_act_quantizer'))


def placeholder(shape, generator: torch.Generator) -> torch.Tensor:
    """A skeleton tensor the rewrite overwrites: values in [1, 2), distinct
    from every other's (the exporter's optimizer merges equal small
    initializers, after which one name would stand for several layers)."""
    return torch.rand(shape, generator=generator) + 1


class FlatLinear(nn.Linear):
    """A Linear on rows: the exporter emits ``Gemm`` on the named weight
    (on a 3-D input it emits a MatMul reading a folded, renamed
    transpose, which the rewrite could not find)."""

    def forward(self, x):
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        rows = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])


class _NormedInput:
    """NormedLinear / NormedConv2d's input scaling, then the plain op on
    the weight initializer (the normalized weight comes from the rewrite)."""

    def forward(self, x):
        x = x / (x.norm(dim=1, keepdim=True).pow(self.power) + self.eps)
        return super().forward(x * self.tempearture)


class _NormedLinear(_NormedInput, FlatLinear):
    pass


class _NormedConv2d(_NormedInput, nn.Conv2d):
    pass


class _DeformConv(nn.Module):
    """mmcv (Modulated)DeformConv2d(Pack) as torchvision's
    ``deform_conv2d``, which torch's exporter emits as ONNX DeformConv
    (same offset and mask layout as mmcv's: equal outputs measured)."""

    def forward(self, x, offset=None, mask=None):
        from torchvision.ops import deform_conv2d
        if offset is None:  # the Pack forms: offsets from conv_offset
            offset = self.conv_offset(x)
            if getattr(self, 'modulated', False):
                o1, o2, mask = torch.chunk(offset, 3, dim=1)
                offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride,
                             self.padding, self.dilation, mask)


class _AttentionProjections:
    """MultiheadAttentionLayer's forward with q, k, v as three named
    FlatLinears and no quantizers (the rewrite adds them)."""

    def _quantize(self, quantizer, x):
        return x

    def _in_projection(self, query, key, value):
        return (getattr(self, proj)(x) for (proj, _), x in
                zip(PROJECTIONS, (query, key, value)))


def _deform_kind(module) -> Optional[str]:
    """'deform' or 'modulated' for mmcv's deformable convs (mmcv.ops is
    imported by any model that holds one; importing it here costs
    seconds)."""
    ops = sys.modules.get('mmcv.ops')
    if ops is None:
        return None
    if isinstance(module, ops.ModulatedDeformConv2d):
        return 'modulated'
    return 'deform' if isinstance(module, ops.DeformConv2d) else None


def _plain_conv(module: QConv2d, generator) -> nn.Module:
    new = nn.Conv2d.__new__(nn.Conv2d)
    nn.Conv2d.__init__(new, module.in_channels, module.out_channels,
                       module.kernel_size, module.stride, module.padding,
                       module.dilation, module.groups, True,
                       module.padding_mode, device='meta')
    new.weight = nn.Parameter(module.weight.detach().clone())
    return new


def _plain_linear(module: QLinear, generator) -> nn.Module:
    new = FlatLinear(module.in_features, module.out_features, True,
                     device='meta')
    new.weight = nn.Parameter(module.weight.detach().clone())
    return new


def _own_float_type(module, generator) -> type:
    """The float layer's own op (a deformable conv's through torchvision)."""
    if _deform_kind(module) is not None:
        module.modulated = _deform_kind(module) == 'modulated'
        return _DeformConv
    return type(module).__bases__[-1]


def _deform_pack(module, generator) -> type:
    module.modulated = _deform_kind(module) == 'modulated'
    return _DeformConv


def _normed(module, generator) -> type:
    return _NormedLinear if isinstance(module, nn.Linear) else _NormedConv2d


def _attention(module, generator) -> type:
    embed = module.embed_dim
    for proj, _ in PROJECTIONS:
        linear = FlatLinear(embed, embed)
        linear.weight.data = placeholder(linear.weight.shape, generator)
        linear.bias.data = placeholder(embed, generator)
        setattr(module, proj, linear)
    return type('AttentionStandIn', (_AttentionProjections, type(module)), {})


# form -> its stand-in: a new float module (QConv2d, QLinear), or the float
# class that an in-place form's module becomes. One per form: a new form's
# forward may use the weight in another op, so none is inherited.
STAND_INS = {
    QConv2d: _plain_conv, QLinear: _plain_linear,
    SwappedWeightLayer: _own_float_type, TransposedConvLayer: _own_float_type,
    DeformConvPackLayer: _deform_pack,
    ModulatedDeformConvPackLayer: _deform_pack,
    ConvWSLayer: lambda module, generator: nn.Conv2d,
    ConvAWSLayer: lambda module, generator: nn.Conv2d,
    NormedLayer: _normed, MultiheadAttentionLayer: _attention,
    EmbeddingLayer: _own_float_type}


def export_refusal(module: QuantLayer) -> Optional[str]:
    """Why the export cannot express ``module`` (None: it can)."""
    if isinstance(module.act_quantizer, PerLevel):
        return EXPORT_REFUSAL
    if form_of(module) not in STAND_INS:
        return (f'the export has no stand-in for its form '
                f'{form_of(module).__name__} (mmdrq.deploy.layer_forms.'
                'STAND_INS)')
    if isinstance(module, MultiheadAttentionLayer) and any(
            getattr(module, name, None) is not None
            for name in module.MATMUL_QUANTIZERS):
        return ('its attention matmul inputs are quantized '
                '(attention_matmuls=True), which the export does not '
                'express; convert with attention_matmuls=False')
    if _deform_kind(module) is not None:
        try:
            import torchvision.ops  # noqa: F401
        except ImportError:
            return 'deformable convs export through torchvision, missing'
    return None


def stand_in(module: QuantLayer, generator: torch.Generator) -> nn.Module:
    """The skeleton's float stand-in for a quantized layer: a new module for
    QConv2d / QLinear, else ``module`` itself (a copy's) changed in place
    into its form's float class. Every stand-in has a bias, for the rewrite
    to write (and the folded BN's shift); the weights and biases it adds are
    placeholders from the skeleton's ``generator``, distinct so that no
    pass merges them."""
    made = STAND_INS[form_of(module)](module, generator)
    if isinstance(made, nn.Module):
        return made
    out = module.weight_to_quantize().shape[0]
    for name in [n for n in module._modules if n.endswith('_quantizer')]:
        setattr(module, name, None)  # MultiheadAttentionLayer reads them
    module.__class__ = made
    if getattr(module, 'bias', None) is None and \
            not isinstance(module, (MultiheadAttentionLayer, EmbeddingLayer)):
        module.bias = nn.Parameter(placeholder(out, generator))
    return module


class Part(NamedTuple):
    """A weight initializer of the skeleton that a quantized layer owns:
    ``key`` the initializer's module path, ``rows`` its output channels
    among the layer's, ``act`` the quantizer of the op's input."""
    layer: str
    key: str
    rows: slice
    act: Optional[nn.Module]


def weight_parts(layers: Dict[str, QuantLayer]) -> Dict[str, Part]:
    """Skeleton weight initializer name -> Part, for the in-place
    quantized layers."""
    parts = {}
    for name, module in layers.items():
        if not isinstance(module, SwappedWeightLayer):
            continue
        if isinstance(module, MultiheadAttentionLayer):
            embed = module.embed_dim
            for index, (proj, act) in enumerate(PROJECTIONS):
                key = f'{name}.{proj}'
                parts[f'{PREFIX}{key}.weight'] = Part(
                    name, key, slice(index * embed, (index + 1) * embed),
                    getattr(module, act))
        else:
            parts[f'{PREFIX}{name}.weight'] = Part(
                name, name, slice(None), module.act_quantizer)
    return parts


def emit(rewrite, node, part: Part) -> list:
    """Rewrite ``node`` (a Conv, ConvTranspose, Gemm or DeformConv of
    ``part``): bias with the folded BN, the bit's integer weight into
    DequantizeLinear (once per part; a shared weight's other calls reuse
    it), the input through Q/DQ. Returns the nodes to put before it."""
    module = rewrite.modules[part.layer]
    bit = rewrite.layer_bits[part.layer]
    prefix = part.key  # one name at every bit
    out = len(range(module.weight_to_quantize().shape[0])[part.rows])
    factor, shift = rewrite.bn_fold(part.key, out)
    bias = _bias(module, part.rows, out)
    rewrite.set_init(node.input[BIAS_INPUT[node.op_type]],
                     (bias * factor + shift).float().numpy())

    def make():
        q, scale = _bit_integers(module, bit, part.rows)
        return weight_nodes(rewrite, module, prefix, q, scale * factor, bit)
    nodes = dequantized_once(rewrite, part.key, node, 1, make)
    call = rewrite.calls[part.key] = rewrite.calls.get(part.key, -1) + 1
    if part.act is not None:
        nodes += rewrite.input_qdq(node, prefix, part.act, bit,
                                   prefix if call == 0 else
                                   f'{prefix}.call{call}')
    return nodes


def emit_table(rewrite, node, part: Part) -> list:
    """Rewrite a ``Gather`` of ``part``'s table (an embedding): the bit's
    integer table into DequantizeLinear (a scale per row), gathered as
    before. Returns the nodes to put before it."""
    module = rewrite.modules[part.layer]
    bit = rewrite.layer_bits[part.layer]

    def make():
        q, scale = _bit_integers(module, bit, part.rows)
        return weight_nodes(rewrite, module, part.key, q, scale, bit)
    return dequantized_once(rewrite, part.key, node, 0, make)


def dequantized_once(rewrite, key: str, node, index: int, make) -> list:
    """Point input ``index`` of ``node`` at layer ``key``'s dequantized
    weight, whose nodes ``make()`` builds at its first use (its float
    initializer removed); a shared layer's later calls reuse it. Returns
    the new nodes."""
    nodes = []
    if key not in rewrite.weights:
        nodes = make()
        rewrite.graph.initializer.remove(rewrite.inits.pop(node.input[index]))
        rewrite.weights[key] = nodes[-1].output[0]
    node.input[index] = rewrite.weights[key]
    return nodes


def _bit_integers(module, bit: int, rows: slice):
    """The ``rows`` of the bit's integers of the weight the layer quantizes
    (output channels first) in the int8 container, and their scale."""
    q, scale = container_integers(module.weight_quantizer,
                                  module.weight_to_quantize(), bit)
    return q[rows], scale[rows]


def _bias(module, rows: slice, out: int) -> torch.Tensor:
    bias = module.in_proj_bias if isinstance(
        module, MultiheadAttentionLayer) else getattr(module, 'bias', None)
    if bias is None:
        return torch.zeros(out, dtype=torch.float64)
    return bias.detach().double()[rows]


def weight_nodes(rewrite, module, prefix: str, q: torch.Tensor,
                 scale: torch.Tensor, bit: int) -> list:
    """int8 initializer ``q`` (the container's integers at ``bit``, noted in
    ``rewrite.integers`` with how they derive from the stored ones) with
    ``scale``, zero point 0, into DequantizeLinear on the output
    channel axis of the op's layout; a grouped transposed conv's weight is
    dequantized output-channels-first and then regrouped to ONNX's
    ``(in, out / groups, *k)``."""
    set_init = rewrite.set_init
    quantizer = module.weight_quantizer
    rewrite.integers[prefix + '.weight_q'] = dict(
        bit=bit, stored_bit=quantizer.stored_bit, shift=quantizer.shift(bit),
        rounding=quantizer.rounding, mode=second_rounding_mode(quantizer))
    scale = scale.float()
    transposed = isinstance(module, TransposedConvLayer)
    groups = module.groups if transposed else 1
    axis = 1 if transposed and groups == 1 else 0
    if axis == 1:
        q = q.transpose(0, 1)
    set_init(prefix + '.weight_q', q.contiguous().numpy())
    set_init(prefix + '.weight_scale', scale.numpy())
    set_init(prefix + '.weight_zero_point',
             torch.zeros(len(scale), dtype=torch.int8).numpy())
    grouped = transposed and groups > 1
    out_name = prefix + ('.weight_channel_major' if grouped else '.weight')
    nodes = [helper.make_node(
        'DequantizeLinear', [prefix + '.weight_q', prefix + '.weight_scale',
                             prefix + '.weight_zero_point'], [out_name],
        axis=axis, name=prefix + '.weight_dq')]
    if grouped:  # (out, in/g, *k) -> (g, out/g, in/g, *k) -> (in, out/g, *k)
        out, per_group, kernel = q.shape[0], q.shape[1], list(q.shape[2:])
        split = [groups, out // groups, per_group] + kernel
        set_init(prefix + '.weight_split', torch.tensor(split).numpy())
        set_init(prefix + '.weight_shape', torch.tensor(
            [groups * per_group, out // groups] + kernel).numpy())
        perm = [0, 2, 1] + list(range(3, 3 + len(kernel)))
        nodes += [
            helper.make_node('Reshape', [out_name, prefix + '.weight_split'],
                             [prefix + '.weight_split_out'],
                             name=prefix + '.weight_split'),
            helper.make_node('Transpose', [prefix + '.weight_split_out'],
                             [prefix + '.weight_regrouped'], perm=perm,
                             name=prefix + '.weight_regroup'),
            helper.make_node('Reshape', [prefix + '.weight_regrouped',
                                         prefix + '.weight_shape'],
                             [prefix + '.weight'],
                             name=prefix + '.weight_reshape')]
    return nodes
