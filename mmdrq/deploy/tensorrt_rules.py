"""TensorRT's explicit-quantization rules, checked on an ONNX graph.

TensorRT cannot be installed here, so an export is checked structurally
against what TensorRT's Q/DQ handling documents: symmetric INT8 (zero point
0, signed: TensorRT has no UINT8 Q/DQ), weights as constant int8 through a
per-output-channel DequantizeLinear on axis 0, activations per tensor (one
scale), every quantized convolution fed by DequantizeLinear on both inputs,
QuantizeLinear directly followed by DequantizeLinear, and residual adds
whose inputs are both dequantized (else TensorRT adds in float). Each rule
maps to the node names that break it; an empty list means it holds.
"""
from typing import Dict, List

import onnx
from onnx import numpy_helper

RULES = {
    'symmetric': 'Q/DQ zero point is 0',
    'signed_int8': 'Q/DQ type is INT8 (TensorRT has no UINT8 Q/DQ)',
    'weights_per_channel': 'conv/gemm weight: constant int8 initializer '
                           'through DequantizeLinear with one scale per '
                           'output channel on axis 0',
    'activations_per_tensor': 'activation Q/DQ has one scale',
    'q_then_dq': 'QuantizeLinear is directly followed by DequantizeLinear',
    'conv_inputs_dequantized': 'a conv with a quantized weight has a '
                               'dequantized input',
    'add_inputs_dequantized': 'residual Add: both inputs dequantized (else '
                              'TensorRT adds in float after an int8 conv '
                              'with float output)',
}


def check_tensorrt_rules(proto: onnx.ModelProto) -> Dict[str, List[str]]:
    """Rule name -> names of the nodes that break it."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {rule: [] for rule in RULES}

    def from_dq(name):
        node = producers.get(name)
        return node is not None and node.op_type == 'DequantizeLinear'

    for node in graph.node:
        if node.op_type in ('QuantizeLinear', 'DequantizeLinear'):
            if len(node.input) > 2 and node.input[2] in inits:
                zero = numpy_helper.to_array(inits[node.input[2]])
                if zero.any():
                    found['symmetric'].append(node.name)
                if zero.dtype.name != 'int8':
                    found['signed_int8'].append(node.name)
            weight = node.op_type == 'DequantizeLinear' and \
                node.input[0] in inits
            scale = inits.get(node.input[1])
            if not weight and (scale is None or
                               numpy_helper.to_array(scale).size != 1):
                found['activations_per_tensor'].append(node.name)
        if node.op_type == 'QuantizeLinear' and any(
                c.op_type != 'DequantizeLinear'
                for c in consumers.get(node.output[0], [])):
            found['q_then_dq'].append(node.name)
        if node.op_type in ('Conv', 'Gemm') and from_dq(node.input[1]):
            dq = producers[node.input[1]]
            axis = next((a.i for a in dq.attribute if a.name == 'axis'), 1)
            weight = inits.get(dq.input[0])
            scale = inits.get(dq.input[1])
            if weight is None or weight.data_type != onnx.TensorProto.INT8 \
                    or scale is None or axis != 0 or \
                    list(scale.dims) != [weight.dims[0]]:
                found['weights_per_channel'].append(node.name)
            if not from_dq(node.input[0]):
                found['conv_inputs_dequantized'].append(node.name)
        if node.op_type == 'Add' and not all(from_dq(i) for i in node.input
                                             if i not in inits):
            found['add_inputs_dequantized'].append(node.name)
    return found
