"""One bit's rewrite of a copy of the float graph into its QDQ form (the
forms: ``mmdrq.deploy.onnx_export``'s docstring)."""
import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from mmdrq.quantization.bitwidths import signed_range
from mmdrq.quantization.integers import (CONTAINER_BIT, bn_affine,
                                         folded_bias, int_range, is_signed,
                                         scale_at, weight_integers)
from mmdrq.quantization.layers import QuantLayer
from .float_graph import module_of
from .layer_forms import (BIAS_INPUT, dequantized_once, emit, emit_table,
                          weight_nodes)


class QDQRewrite:
    """One bit's rewrite of a copy of ``exporter``'s float graph:
    ``layer_bits`` each layer's bit, ``active`` the BN copy each
    switchable norm runs at those bits."""

    def __init__(self, exporter, proto, layer_bits, active):
        self.exporter, self.proto = exporter, proto
        self.graph = proto.graph
        self.layer_bits, self.active = layer_bits, active
        self.inits = {init.name: init for init in self.graph.initializer}
        self.modules = dict(exporter.model.named_modules())
        self.weights, self.calls = {}, {}  # per layer: weight DQ, calls
        self.integers = {}  # weight integer initializer -> its derivation
        self.handled = set()  # layers whose weight and bias are set

    def set_init(self, name: str, array: np.ndarray):
        tensor = numpy_helper.from_array(array, name)
        if name in self.inits:
            self.inits[name].CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.inits[name] = self.graph.initializer[-1]

    def run(self):
        new_nodes = []
        for node in self.graph.node:
            part = self.exporter.parts.get(node.input[1]) \
                if node.op_type in BIAS_INPUT and len(node.input) > 1 \
                else None
            if part is not None:
                self.handled.add(part.layer)
                new_nodes += emit(self, node, part)
                new_nodes.append(node)
                continue
            table = self.exporter.parts.get(node.input[0]) \
                if node.op_type == 'Gather' else None
            if table is not None:
                self.handled.add(table.layer)
                new_nodes += emit_table(self, node, table)
                new_nodes.append(node)
                continue
            name = module_of(node.input[1], '.weight') \
                if node.op_type in ('Conv', 'Gemm') and \
                len(node.input) > 1 else None
            if name is not None and name in self.modules:
                new_nodes += self.weight_layer(node, name)
            elif node.op_type == 'BatchNormalization':
                self.batch_norm(node)
            new_nodes.append(node)
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        self.group_and_layer_norms()
        self.plain_biases()

    def plain_biases(self):
        """The bias of a layer the graph computes without a Conv or Gemm
        node (a Linear on 3-d input: MatMul, then Add): the model's own,
        zeros where it has none, in place of the skeleton's placeholder."""
        for init in list(self.inits):
            name = module_of(init, '.bias')
            module = self.modules.get(name)
            if name in self.handled or \
                    not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            shape = tuple(self.inits[init].dims)
            bias = torch.zeros(shape) if module.bias is None else \
                module.bias.detach().float().reshape(shape)
            self.set_init(init, bias.numpy())

    def group_and_layer_norms(self):
        """Switchable GN/LN: the bit's copy's affine, wherever the graph
        holds it (LN's node inputs, the Mul/Add of ``_GroupNormAffine``)."""
        for key in ('weight', 'bias'):
            for init in list(self.inits):
                norm = self.active.get(module_of(init, '.' + key))
                if isinstance(norm, (nn.GroupNorm, nn.LayerNorm)):
                    shape = tuple(self.inits[init].dims)
                    value = getattr(norm, key).detach().float().reshape(shape)
                    self.set_init(init, value.numpy())

    def batch_norm(self, node):
        """A BN not folded: the bit's copy's parameters."""
        name = module_of(node.input[1], '.weight')
        bn = self.active.get(name)
        if bn is None:
            return
        for index, key in enumerate(
                ('weight', 'bias', 'running_mean', 'running_var'), 1):
            self.set_init(node.input[index],
                          getattr(bn, key).detach().float().numpy())

    def bn_fold(self, name: str, weight_out: int):
        """(factor, shift) of the BN folded into layer ``name`` (1, 0 if
        none), float64."""
        bn_name = self.exporter.folded.get(name)
        if bn_name is None:
            return torch.ones(weight_out, dtype=torch.float64), \
                torch.zeros(weight_out, dtype=torch.float64)
        bn = self.active.get(bn_name, self.modules[bn_name])
        return bn_affine(bn)

    def weight_layer(self, node, name: str) -> list:
        """Set the layer's weight and bias; for a quantized layer, the int8
        weight into DequantizeLinear and the input through Q/DQ. Returns
        the nodes to put before ``node``."""
        module = self.modules[name]
        self.handled.add(name)
        if node.op_type == 'Gemm' and not any(
                a.name == 'transB' and a.i == 1 for a in node.attribute):
            raise ValueError(f'layer {name!r}: Gemm without transB=1 '
                             '(weight not in its PyTorch layout)')
        out = module.weight.shape[0]
        factor, shift = self.bn_fold(name, out)
        self.set_init(node.input[2],
                      folded_bias(module, factor, shift).numpy())
        view = (-1, ) + (1, ) * (module.weight.dim() - 1)
        if not isinstance(module, QuantLayer):
            weight = module.weight.detach().double() * factor.view(view)
            if node.input[1] not in self.inits:  # a layer called again
                return []
            return self.fp_weight(node.input[1], weight)
        bit = self.layer_bits[name]
        prefix = name  # one name at every bit: one graph serves them all

        def make():
            q, scale = weight_integers(module, bit)
            return weight_nodes(self, module, prefix, q, scale * factor, bit)
        nodes = dequantized_once(self, name, node, 1, make)
        call = self.calls[name] = self.calls.get(name, -1) + 1
        if module.act_quantizer is not None:
            nodes += self.input_qdq(node, prefix, module.act_quantizer, bit,
                                    prefix if call == 0 else
                                    f'{prefix}.call{call}')
        return nodes

    def fp_weight(self, name: str, weight: torch.Tensor) -> list:
        """A float layer's (BN-folded) weight stored as the exporter's
        ``fp_layers`` says; the nodes that give ``name`` back in float."""
        storage = self.exporter.fp_layers
        if storage == 'float32':
            self.set_init(name, weight.float().numpy())
            return []
        self.graph.initializer.remove(self.inits.pop(name))
        if storage == 'float16':
            self.set_init(name + '_fp16', weight.half().numpy())
            return [helper.make_node(
                'Cast', [name + '_fp16'], [name],
                to=onnx.TensorProto.FLOAT, name=name + '_cast')]
        view = (-1, ) + (1, ) * (weight.dim() - 1)
        scale = weight.abs().flatten(1).amax(1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
        q = torch.round(weight / scale.double().view(view)).clamp(-127, 127)
        self.set_init(name + '_q', q.to(torch.int8).numpy())
        self.set_init(name + '_scale', scale.numpy())
        self.set_init(name + '_zero_point',
                      np.zeros(len(scale), dtype=np.int8))
        return [helper.make_node(
            'DequantizeLinear', [name + '_q', name + '_scale',
                                 name + '_zero_point'], [name], axis=0,
            name=name + '_dq')]

    def input_qdq(self, node, prefix: str, act, bit: int, tag: str) -> list:
        """QuantizeLinear (-> Clip) -> DequantizeLinear on the input; for
        TensorRT, Clip -> QuantizeLinear -> DequantizeLinear in int8."""
        signed = is_signed(act)
        lo, hi = int_range(act, bit)
        scale = scale_at(act, bit).float()
        tensorrt = self.exporter.target == 'tensorrt'
        if tensorrt and hi > signed_range(CONTAINER_BIT)[1]:
            raise ValueError(
                f'layer {prefix!r}: unsigned {bit}-bit activations (0..{hi}) '
                'do not fit TensorRT\'s int8 Q/DQ; export that bit with '
                "target='onnxruntime'")
        dtype = np.int8 if signed or tensorrt else np.uint8
        self.set_init(prefix + '.input_scale', scale.numpy())
        self.set_init(prefix + '.input_zero_point', np.zeros((), dtype))
        quant = [prefix + '.input_scale', prefix + '.input_zero_point']
        source, nodes = node.input[0], []
        # every bit clips to its range, 8 bits included (where it clips
        # nothing: sessions drop it), so that one graph serves every bit
        if tensorrt:
            # float bounds fl(lo * s), fl(hi * s): x / s is monotonic and
            # fl(hi * s) / s rounds to hi, so the integers are unchanged
            bounds = (torch.tensor([lo, hi], dtype=torch.float32) *
                      scale).numpy()
            self.set_init(prefix + '.input_min', bounds[0])
            self.set_init(prefix + '.input_max', bounds[1])
            nodes.append(helper.make_node(
                'Clip', [source, prefix + '.input_min', prefix + '.input_max'],
                [tag + '.input_clipped'], name=tag + '.input_clip'))
            source = tag + '.input_clipped'
        nodes.append(helper.make_node(
            'QuantizeLinear', [source] + quant, [tag + '.input_q'],
            name=tag + '.input_quantize'))
        integers = tag + '.input_q'
        if not tensorrt:
            self.set_init(prefix + '.input_min', np.array(lo, dtype))
            self.set_init(prefix + '.input_max', np.array(hi, dtype))
            nodes.append(helper.make_node(
                'Clip', [integers, prefix + '.input_min',
                         prefix + '.input_max'],
                [tag + '.input_q_clipped'], name=tag + '.input_clip'))
            integers = tag + '.input_q_clipped'
        nodes.append(helper.make_node(
            'DequantizeLinear', [integers] + quant, [tag + '.input'],
            name=tag + '.input_dequantize'))
        node.input[0] = tag + '.input'
        return nodes
