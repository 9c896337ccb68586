"""Q/DQ around residual adds, with scales calibrated on real inputs.

ONNX Runtime fuses ``DQ -> Conv -> Q`` into an integer convolution only
when the conv's output goes straight into a QuantizeLinear of the type its
input has, and ``DQ, DQ -> Add -> Q`` into QLinearAdd only when all three
share a type. A trained mmdrq model's residual stream is float, so a
ResNet block's last conv (and its downsample) feeds a float Add and stays
a float kernel. ``add_residual_qdq`` quantizes that stream at 8 bits per
tensor, symmetric:

- every input of a residual Add (both operands activations) that is not
  already dequantized (a conv's output, a pooled stem output), on the edge
  into the add only;
- the Add's output, after its ReLU when the ReLU is its only consumer
  (then unsigned: zero point 0, so ONNX Runtime drops the ReLU into the
  QuantizeLinear and the block's output is quantized once for every
  consumer: the next block's convs and its identity path). Where every
  quantized reader of that output quantizes it at the whole 8-bit
  container, the output takes the largest of the readers' scales and they
  all take it too: each reader's QuantizeLinear then reads a
  DequantizeLinear of the same scale and zero point, which ONNX Runtime
  removes (no requantization; the graph keeps the same nodes at every
  bit, as one export folder needs).

Signed tensors go in the graph's activation container: uint8 with zero
point 128 where the convs' inputs are uint8 (ONNX Runtime, unsigned
activation quantizers), else int8 with zero point 0 (``tensorrt``). Scales
are ``max|x| / 127`` (signed) or ``max|x| / 255`` (unsigned uint8) over
the calibration inputs, measured on the graph before the insertion (which
computes what PyTorch computes at that bit). The trained model has no such
rounding: this graph is not bit-equal to PyTorch.
"""
from typing import Dict, Sequence

import numpy as np
import onnx
from mmdrq.utils.checks import check_choice
from onnx import helper, numpy_helper

RESIDUAL_MODES = ('none', 'calibrated')
_UNSIGNED_PRODUCERS = ('Relu', )
_PASS_SIGN = ('MaxPool', 'AveragePool', 'GlobalAveragePool', 'ReduceMean',
              'Reshape', 'Flatten', 'Squeeze', 'Unsqueeze')  # keep signs


def check_residual_mode(mode: str, calibration) -> None:
    """Refuse an unknown mode, or 'calibrated' without inputs, before any
    work."""
    check_choice('residual_qdq', mode, RESIDUAL_MODES)
    if mode == 'calibrated' and not calibration:
        raise ValueError("residual_qdq='calibrated' needs calibration inputs "
                         '(a few batches after the data preprocessor)')


def producers_of(graph) -> Dict[str, onnx.NodeProto]:
    """Tensor name -> the node writing it."""
    return {out: node for node in graph.node for out in node.output}


def is_unsigned(name: str, producers) -> bool:
    """Whether tensor ``name`` is a ReLU's output, through ops that keep
    signs (pooling, reshapes)."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_SIGN:
        node = producers.get(node.input[0])
    return node is not None and node.op_type in _UNSIGNED_PRODUCERS


def _float_tensors(proto: onnx.ModelProto) -> set:
    """Names of the graph's float32 tensors (shape inference's types), so
    shape arithmetic (int64 Adds) is left alone."""
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    return {v.name for v in list(inferred.value_info) +
            list(inferred.output) + list(inferred.input)
            if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def residual_tensors(proto: onnx.ModelProto):
    """Where the residual stream needs Q/DQ, as two dicts tensor name ->
    unsigned: ``outputs`` (an Add's output, or its ReLU's; and a quantized
    conv's output that feeds more than one QuantizeLinear, or other ops
    than adds: an FPN level read by two head branches, a top lateral also
    upsampled) quantized for every consumer, and ``operands`` (Add inputs
    not already dequantized) quantized on the edges into residual adds
    only. The edge keeps a tensor's other consumers reading float: a pooled
    float stem's output read by a conv's own Q as well stays a float
    MaxPool (ONNX Runtime would move a lone Q in front of it, and its
    uint8 MaxPool after a float conv is slow; ``--fp-layers int8`` makes
    the stem an integer conv and that pooling integer too)."""
    graph = proto.graph
    producers = producers_of(graph)
    floats = _float_tensors(proto)
    inits = {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs, operands = {}, {}
    for node in graph.node:
        if node.op_type != 'Add' or len(node.input) != 2 or \
                node.output[0] not in floats or \
                any(i in inits or i not in producers for i in node.input):
            continue
        for name in node.input:
            if producers[name].op_type != 'DequantizeLinear':
                operands[name] = is_unsigned(name, producers)
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == 'Relu' and \
                node.output[0] not in graph_outputs:
            outputs[users[0].output[0]] = True
        else:
            outputs[node.output[0]] = False
    for node in graph.node:  # quantized convs that could not fuse
        if node.op_type != 'Conv' or any(
                producers.get(i) is None or
                producers[i].op_type != 'DequantizeLinear'
                for i in node.input[:2]):
            continue
        name = fused_output(node.output[0], consumers, graph_outputs)
        users = consumers.get(name, [])
        lone_q = len(users) == 1 and users[0].op_type == 'QuantizeLinear'
        if name not in graph_outputs and users and not lone_q and \
                not all(u.op_type == 'Add' for u in users):
            outputs[name] = is_unsigned(name, producers)
    # a block's output is the next block's identity operand: quantized once
    operands = {k: v for k, v in operands.items() if k not in outputs}
    return outputs, operands


def fused_output(name: str, consumers: dict, graph_outputs) -> str:
    """Where a conv's output can take its QuantizeLinear: after its ReLU
    and max pooling, each the only reader (ONNX Runtime drops the ReLU
    into the Q and moves the Q in front of the pooling, which then runs on
    the integers)."""
    while len(consumers.get(name, [])) == 1 and name not in graph_outputs \
            and consumers[name][0].op_type in ('Relu', 'MaxPool'):
        name = consumers[name][0].output[0]
    return name


def activation_container(graph, target: str):
    """uint8 when ONNX Runtime's convs read uint8 (types around a fused
    conv and add must match), else int8."""
    if target == 'onnxruntime':
        inits = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == 'QuantizeLinear' and len(node.input) > 2 and \
                    node.input[2] in inits and inits[node.input[2]]\
                    .data_type == onnx.TensorProto.UINT8:
                return np.uint8
    return np.int8


def calibrate_ranges(proto: onnx.ModelProto, names: Sequence[str],
                     inputs: Sequence[np.ndarray]) -> Dict[str, float]:
    """max|x| of each named tensor over ``inputs``, run by ONNX Runtime
    with QDQ fusion off (the graph's float computation)."""
    from mmdrq_runtime.session import make_session
    probe = onnx.ModelProto.FromString(proto.SerializeToString())
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.append(
                helper.make_empty_tensor_value_info(name))
    session = make_session(probe.SerializeToString(), kernels='exact')
    input_name = session.get_inputs()[0].name
    ranges = dict.fromkeys(names, 0.0)
    for batch in inputs:
        values = session.run(list(names), {input_name: batch})
        for name, value in zip(names, values):
            ranges[name] = max(ranges[name], float(np.abs(value).max()))
    return ranges


def _shared_consumers(name: str, dtype, inits: dict, users: dict) -> list:
    """The QuantizeLinear nodes that quantize ``name`` for quantized
    layers, when every one does so at the whole ``dtype`` container (its
    DequantizeLinear, or an integer Clip that clips nothing, right after)
    with zero point 0 and a scale of its own (read by its Q and DQ only);
    else []. ``inits``: the graph's initializers by name; ``users``: tensor
    name -> the nodes reading it."""
    info = np.iinfo(dtype)
    found = []
    for node in users.get(name, []):
        if node.op_type != 'QuantizeLinear':
            continue
        scale, zero = node.input[1], node.input[2]
        if zero not in inits or scale not in inits or \
                numpy_helper.to_array(inits[zero]).dtype != dtype or \
                numpy_helper.to_array(inits[zero]).any() or \
                len(users.get(scale, [])) != 2:  # its Q and DQ: one call
            return []
        after = users.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type not in ('Clip',
                                                       'DequantizeLinear'):
            return []
        if after[0].op_type == 'Clip':
            bounds = [numpy_helper.to_array(inits[i]) if i in inits else None
                      for i in after[0].input[1:]]
            if len(bounds) != 2 or any(b is None for b in bounds) or \
                    bounds[0] != info.min or bounds[1] != info.max:
                return []
        found.append(node)
    return found


def share_readers_scale(name: str, dtype, inits: dict, users: dict,
                        scale: np.float32) -> np.float32:
    """The scale for quantizing ``name`` for every reader: where all its
    quantized readers quantize it at the whole container
    (``_shared_consumers``), the largest of their scales, which they all
    take too (ONNX Runtime then removes each reader's DQ -> Q); else
    ``scale``."""
    shared = _shared_consumers(name, dtype, inits, users)
    if not shared:
        return scale
    scale = max(numpy_helper.to_array(inits[q.input[1]])
                for q in shared).astype(np.float32)
    for q in shared:
        inits[q.input[1]].CopyFrom(numpy_helper.from_array(
            np.array(scale), q.input[1]))
    return scale


def add_residual_qdq(proto: onnx.ModelProto, inputs: Sequence[np.ndarray],
                     target: str) -> Dict[str, float]:
    """Insert the calibrated Q/DQ pairs into ``proto`` (in place); returns
    tensor name -> scale."""
    outputs, operands = residual_tensors(proto)
    if not outputs:
        return {}
    users = readers_of(proto.graph)
    edges = {name: (unsigned, {n.output[0] for n in users[name]
                               if n.op_type == 'Add'})
             for name, unsigned in operands.items()}
    return quantize_tensors(proto, outputs, edges, inputs, target)


def readers_of(graph) -> Dict[str, list]:
    """Tensor name -> the nodes reading it."""
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def quantize_tensors(proto: onnx.ModelProto, outputs: Dict[str, bool],
                     edges: Dict[str, tuple], inputs: Sequence[np.ndarray],
                     target: str) -> Dict[str, float]:
    """8-bit Q/DQ pairs, scales ``max|x|`` over ``inputs`` (measured on the
    graph before the insertion), in ``activation_container``: ``outputs``
    (name -> unsigned) for every reader, sharing their quantized readers'
    scale where they all read the whole container
    (``share_readers_scale``); ``edges`` (name -> (unsigned, first output
    names of the readers)) on the edges into those readers only. Returns
    tensor name -> scale."""
    graph = proto.graph
    ranges = calibrate_ranges(proto, list(outputs) + list(edges), inputs)
    dtype = activation_container(graph, target)
    position = {out: index for index, node in enumerate(graph.node)
                for out in node.output}
    position.update({i.name: -1 for i in graph.input})
    inits = {i.name: i for i in graph.initializer}
    users = readers_of(graph)
    after, scales = {}, {}
    # the edges first: their readers are named by their outputs, which
    # quantizing an output for every reader renames
    tensors = [(name, unsigned, into)
               for name, (unsigned, into) in edges.items()]
    tensors += [(name, unsigned, None) for name, unsigned in outputs.items()]
    for name, unsigned, into in tensors:
        scale = calibrated_scale(ranges[name], unsigned, dtype)
        zero = 0 if unsigned or dtype == np.int8 else 128
        if into is None and (unsigned or dtype == np.int8):
            scale = share_readers_scale(name, dtype, inits, users, scale)
        scales[name] = float(scale)
        after.setdefault(position[name], []).extend(qdq_nodes(
            graph, name, scale, np.array(zero, dtype), into))
    insert_after(graph, after)
    return scales


def calibrated_scale(largest: float, unsigned: bool, dtype) -> np.float32:
    """``max|x|`` over the container's largest positive integer (255 for
    an unsigned tensor in uint8, else 127)."""
    wide = unsigned and dtype == np.uint8
    return np.float32(max(largest, 1e-8) / (255 if wide else 127))


def qdq_nodes(graph, name: str, scale, zero: np.ndarray,
              readers=None) -> list:
    """QuantizeLinear -> DequantizeLinear of tensor ``name`` (its scale and
    zero point added as initializers), for every reader (the producer's
    output renamed) or, given ``readers`` (the first output names of some
    of its readers), for those only. Returns the two nodes, to go right
    after the producer."""
    if readers is None:  # every consumer reads the dequantized tensor
        source, target = name + '.float', name
        for node in graph.node:
            if name in node.output:
                node.output[list(node.output).index(name)] = source
    else:
        source, target = name, name + '.dequantized'
        for node in graph.node:
            if node.output[0] in readers and name in node.input:
                node.input[list(node.input).index(name)] = target
    graph.initializer.extend([
        numpy_helper.from_array(np.array(scale, np.float32), name + '.scale'),
        numpy_helper.from_array(zero, name + '.zero_point')])
    quant = [name + '.scale', name + '.zero_point']
    return [helper.make_node('QuantizeLinear', [source] + quant,
                             [name + '.q'], name=name + '.quantize'),
            helper.make_node('DequantizeLinear', [name + '.q'] + quant,
                             [target], name=name + '.dequantize')]


def insert_after(graph, after: Dict[int, list]):
    """Put ``after[i]`` right after the graph's node ``i`` (``after[-1]``
    first: the nodes reading a graph input)."""
    nodes = list(after.get(-1, []))
    for index, node in enumerate(graph.node):
        nodes.append(node)
        nodes += after.get(index, [])
    del graph.node[:]
    graph.node.extend(nodes)
