"""8-bit integer kernels for the layers a model keeps FP (a ResNet's stem
and classifier), by post-training quantization at export.

mmdrq trains the layers it quantizes; the stem conv and the classifier stay
float (the usual choice of QAT papers), so an export computes them in float
and stores their float32 weights (the stem is 6 % of ResNet-18's MACs at
224 px, its classifier 2 MB of the 13 MB file). ``fp_layers='int8'``
quantizes them after training, as ONNX Runtime's own ``quantize_static``
does: weights symmetric per output channel (``max|w| / 127``, in the rewrite
of ``OnnxExporter``), and here:

- each such layer's input, 8 bits per tensor, on the edge into the layer;
- its bias, int32 at input scale x weight scale (ONNX Runtime's integer
  Gemm needs it so; TensorRT keeps it float);
- a conv's output (a graph output too, as ``quantize_static`` does), for
  every reader, after its ReLU and max pooling when each is the only
  reader (ONNX Runtime fuses ``DQ -> Conv -> Q`` into an integer conv
  only when a QuantizeLinear follows, and moves the Q in front of a max
  pooling, which then runs on the integers). Where every
  quantized reader takes that tensor at the whole 8-bit container, they
  share one scale (``residual.share_readers_scale``): no requantization.

Scales are ``max|x|`` over the calibration inputs, measured on the graph
before the insertion, in the container ``mmdrq.deploy.residual`` uses
(uint8 with zero point 128 for signed tensors where the convs read uint8).
Not bit-equal to PyTorch: the trained model has no such rounding.
"""
from typing import Dict, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mmdrq.utils.checks import check_choice
from .residual import (fused_output, insert_after, is_unsigned,
                       producers_of, quantize_tensors, readers_of)


FP_LAYERS = ('float32', 'float16', 'int8_weights', 'int8')


def check_fp_layers(fp_layers: str, target: str, calibration) -> None:
    """Refuse an unknown ``fp_layers``, weight-only int8 for TensorRT, or
    ``int8`` without calibration inputs, before any work."""
    check_choice('fp_layers', fp_layers, FP_LAYERS)
    if fp_layers == 'int8_weights' and target == 'tensorrt':
        raise ValueError("fp_layers='int8_weights' (int8 weights, float "
                         "inputs) breaks TensorRT's rule that a conv with a "
                         "dequantized weight has a dequantized input; use "
                         "'int8' or 'float16'")
    if fp_layers == 'int8' and not calibration:
        raise ValueError("fp_layers='int8' needs calibration inputs (a few "
                         'batches after the data preprocessor)')


def float_layers(proto: onnx.ModelProto) -> list:
    """Conv and Gemm nodes with a dequantized weight and a float input:
    the layers kept FP, their weights stored int8."""
    producers = producers_of(proto.graph)
    inits = {i.name for i in proto.graph.initializer}

    def dequantized(name, constant):
        node = producers.get(name)
        return node is not None and node.op_type == 'DequantizeLinear' and \
            (node.input[0] in inits) == constant
    return [node for node in proto.graph.node
            if node.op_type in ('Conv', 'Gemm') and
            dequantized(node.input[1], True) and
            not dequantized(node.input[0], False) and
            node.input[0] not in inits]


def quantize_float_layers(proto: onnx.ModelProto,
                          inputs: Sequence[np.ndarray],
                          target: str) -> Dict[str, float]:
    """Insert the calibrated Q/DQ pairs of ``float_layers`` into ``proto``
    (in place); returns tensor name -> scale."""
    graph = proto.graph
    producers, readers = producers_of(graph), readers_of(graph)
    graph_outputs = {o.name for o in graph.output}
    layers = float_layers(proto)
    edges, outputs = {}, {}  # tensor name -> unsigned
    for node in layers:
        edges[node.input[0]] = is_unsigned(node.input[0], producers)
        if node.op_type != 'Conv':  # a Gemm fuses with a float output
            continue
        name = fused_output(node.output[0], readers, graph_outputs)
        outputs[name] = is_unsigned(name, producers)
    if not edges:
        return {}
    sources = [node.input[0] for node in layers]  # renamed by the insertion
    scales = quantize_tensors(proto, outputs, {
        name: (unsigned, {n.output[0] for n in layers if n.input[0] == name})
        for name, unsigned in edges.items()}, inputs, target)
    if target == 'onnxruntime':
        inits = {i.name: i for i in graph.initializer}
        current = {n.output[0]: n for n in graph.node}  # the graph's copies
        biases = []
        for node, source in zip(layers, sources):
            biases += _int32_bias(graph, current[node.output[0]],
                                  scales[source], inits, producers)
        insert_after(graph, {-1: biases})  # they read initializers only
    return scales


def _int32_bias(graph, node, input_scale, inits: dict, producers) -> list:
    """The float bias of layer ``node`` as int32 at ``input scale * weight
    scale`` into DequantizeLinear (how ONNX Runtime's quantizer stores it;
    its Gemm fuses into an integer kernel only so; TensorRT takes float
    biases and int8 Q/DQ only). Returns the node."""
    if len(node.input) < 3 or node.input[2] not in inits:
        return []
    bias, name = node.input[2], node.output[0] + '.bias'  # one per call
    weight_dq = producers[node.input[1]]
    weight_scale = numpy_helper.to_array(inits[weight_dq.input[1]])
    scale = (np.float64(input_scale) * weight_scale.astype(np.float64)
             ).astype(np.float32)
    values = numpy_helper.to_array(inits[bias]).astype(np.float64)
    info = np.iinfo(np.int32)
    integers = np.clip(np.round(values / scale), info.min, info.max)
    graph.initializer.extend([
        numpy_helper.from_array(integers.astype(np.int32), name + '_q'),
        numpy_helper.from_array(scale, name + '_scale'),
        numpy_helper.from_array(np.zeros(scale.shape, np.int32),
                                name + '_zero_point')])
    node.input[2] = name + '_dequantized'
    if not any(bias in other.input for other in graph.node):
        graph.initializer.remove(inits.pop(bias))  # no value left unread
    return [helper.make_node(
        'DequantizeLinear', [name + '_q', name + '_scale',
                             name + '_zero_point'], [name + '_dequantized'],
        axis=0, name=name + '_dq')]
