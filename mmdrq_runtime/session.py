"""ONNX Runtime sessions over an export folder, switchable by bit."""
from typing import Optional, Union

import numpy as np

from .artifact import ExportFolder


KERNELS = ('exact', 'integer')
# ONNX Runtime passes that would fold the integer graph's per-channel Mul
# and Add back into a conv's weights or a Gemm's alpha (one more rounding)
EXACT_DISABLED_OPTIMIZERS = ('ConvMulFusion', 'ConvAddFusion',
                             'ConvBNFusion', 'MatMulScaleFusion',
                             'MatMulAddFusion')


def make_session(model, threads: Optional[int] = None,
                 kernels: str = 'exact', optimized_path: str = None):
    """A CPU ONNX Runtime session of ``model`` (a path, serialized bytes or
    a ModelProto, which may be changed in place).

    ``kernels='exact'`` runs the quantized convolutions and linears on
    integers (``integer_sums``) with ONNX Runtime's QDQ fusion off
    (``session.disable_quant_qdq``) and without the passes that would fold
    the scaling back into the weights: outputs are those of PyTorch under
    ``mmdrq.quantization.deploy_numerics`` (see there). ``'integer'`` lets
    it fuse DequantizeLinear -> Conv -> QuantizeLinear into integer kernels
    (QLinearConv): faster, but its int32 bias (the folded BN shift rounded
    to input scale times weight scale) and its requantization differ from
    the float computation, which flips some low-bit activations.
    """
    import onnxruntime as ort
    if kernels not in KERNELS:
        raise ValueError(f'kernels must be one of {list(KERNELS)}, got '
                         f'{kernels!r}')
    options = ort.SessionOptions()
    options.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    disabled = []
    proto = drop_identity_clips(_load(model))
    if kernels == 'exact':
        options.add_session_config_entry('session.disable_quant_qdq', '1')
        proto = integer_sums(proto)
        disabled = list(EXACT_DISABLED_OPTIMIZERS)
    model = proto.SerializeToString()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options,
                                providers=['CPUExecutionProvider'],
                                disabled_optimizers=disabled)


def _load(model):
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.ModelProto.FromString(bytes(model))
    return onnx.load(model)  # external data next to the file too


def integer_sums(proto):
    """Rewrite (in place, and return) every Conv/Gemm whose input and
    weight both come from a DequantizeLinear with zero point 0 (a quantized
    layer of the export) to sum the integers: both DequantizeLinear with
    scale 1, no bias, then ``Mul(alpha)`` and ``Add(bias)`` per output
    channel, ``alpha = input scale * weight scale`` rounded once to float32
    (as ``deploy_numerics`` computes it)."""
    from onnx import helper, numpy_helper
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def array(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def dequantized(name):
        """The DequantizeLinear giving ``name`` from an initializer scale
        and a zero zero point, else None."""
        node = producers.get(name)
        if node is None or node.op_type != 'DequantizeLinear' or \
                array(node.input[1]) is None:
            return None
        zero = array(node.input[2]) if len(node.input) > 2 else 0
        return node if zero is not None and not np.any(zero) else None

    def factors(node):
        """(input DQ, weight DQ) when ``node`` is a Conv or a Gemm
        ``x @ w.T`` on a per-tensor input scale and a weight scale per
        output channel (or per tensor), so that the scales factor out of
        the sum; else None."""
        attrs = {a.name: helper.get_attribute_value(a)
                 for a in node.attribute}
        if node.op_type != 'Conv' and not (
                node.op_type == 'Gemm' and attrs.get('transB') == 1 and
                attrs.get('transA', 0) == 0 and
                attrs.get('alpha', 1.0) == attrs.get('beta', 1.0) == 1.0):
            return None
        x_dq, w_dq = (dequantized(n) for n in node.input[:2])
        if x_dq is None or w_dq is None or array(w_dq.input[0]) is None or \
                array(x_dq.input[1]).size != 1:
            return None
        axis = {a.name: a.i for a in w_dq.attribute}.get('axis', 1)
        return (x_dq, w_dq) if array(w_dq.input[1]).size == 1 or axis == 0 \
            else None

    one = 'mmdrq.integer_sums.one'
    new_nodes, made = [], set()
    for node in graph.node:
        pair = factors(node)
        if pair is None:
            new_nodes.append(node)
            continue
        x_dq, w_dq = pair
        name, out = node.name or node.output[0], node.output[0]
        weight_scale = array(w_dq.input[1]).astype(np.float64)
        channels = array(w_dq.input[0]).shape[0]
        alpha = (array(x_dq.input[1]).astype(np.float64) *
                 np.broadcast_to(weight_scale, (channels, ))
                 ).astype(np.float32)
        bias = array(node.input[2]) if len(node.input) > 2 else None
        beta = np.zeros(channels, np.float32) if bias is None else bias
        view = (-1, ) + (1, ) * (len(inits[w_dq.input[0]].dims) - 2) \
            if node.op_type == 'Conv' else (-1, )
        graph.initializer.extend([
            numpy_helper.from_array(alpha.reshape(view), name + '.alpha'),
            numpy_helper.from_array(beta.astype(np.float32).reshape(view),
                                    name + '.beta')])
        for index, dq in enumerate((x_dq, w_dq)):
            if dq.output[0] + '_int' not in made:  # a weight used twice
                made.add(dq.output[0] + '_int')
                new_nodes.append(helper.make_node(
                    'DequantizeLinear', [dq.input[0], one],
                    [dq.output[0] + '_int'], name=dq.name + '_int'))
            node.input[index] = dq.output[0] + '_int'
        del node.input[2:]
        node.output[0] = out + '_int_sum'
        new_nodes += [node, helper.make_node(
            'Mul', [out + '_int_sum', name + '.alpha'], [out + '_scaled'],
            name=name + '.mul_alpha'), helper.make_node(
            'Add', [out + '_scaled', name + '.beta'], [out],
            name=name + '.add_beta')]
    if made:
        graph.initializer.append(
            numpy_helper.from_array(np.array(1.0, np.float32), one))
    used = {i for n in new_nodes for i in n.input} | \
        {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in new_nodes  # the float DQs now unused
                      if n.op_type != 'DequantizeLinear' or
                      n.output[0] in used)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]  # old scales
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def drop_identity_clips(proto):
    """Remove (in place, and return) every integer Clip between a
    QuantizeLinear and its DequantizeLinear whose bounds are the whole
    container: the stored graph clips every bit to its range, which at 8
    bits clips nothing and would only keep ONNX Runtime from fusing."""
    from onnx import numpy_helper
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    rename, keep = {}, []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == 'Clip' \
            else None
        if source is not None and source.op_type == 'QuantizeLinear' and \
                len(node.input) == 3 and all(n in inits
                                             for n in node.input[1:]):
            low, high = (numpy_helper.to_array(inits[n])
                         for n in node.input[1:])
            info = np.iinfo(low.dtype) if low.dtype.kind in 'iu' else None
            if info is not None and low == info.min and high == info.max:
                rename[node.output[0]] = node.input[0]
                continue
        keep.append(node)
    for node in keep:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    for output in graph.output:
        if output.name in rename:
            raise ValueError('a graph output is a Clip of a QuantizeLinear')
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


class SwitchableSession:
    """One ONNX Runtime session per setting of an export folder, made at
    the first use of its bit (or SubNet) and kept; ``set_bits`` switches.
    The folder's files are checked (SHA-256) when it is opened.

    Args:
        folder: an export folder (tools/export_onnx.py).
        threads, kernels: see ``make_session``.
    """

    def __init__(self, folder: str, threads: Optional[int] = None,
                 kernels: str = 'exact'):
        if kernels not in KERNELS:
            raise ValueError(f'kernels must be one of {list(KERNELS)}, got '
                             f'{kernels!r}')
        self.folder = folder
        self.export = ExportFolder(folder)
        self.meta = self.export.meta
        self.threads, self.kernels = threads, kernels
        self.sessions = {}
        self.current = self.available[0]

    @property
    def available(self) -> list:
        """Bits (ints) and SubNet names this folder holds."""
        return self.export.available

    def set_bits(self, bits: Union[int, str]):
        """Run at ``bits``: a bit of the folder or a SubNet's name."""
        self.export.entry(bits)
        self.current = bits
        return self

    def session(self):
        """The current setting's session (made now if it was not yet)."""
        if self.current not in self.sessions:
            self.sessions[self.current] = make_session(
                self.export.model(self.current), self.threads, self.kernels)
        return self.sessions[self.current]

    def run(self, inputs: np.ndarray, **extra: np.ndarray) -> list:
        """Outputs (flat list of arrays) at the current bits; ``extra``:
        a pipeline graph's other inputs (a segmentor's ``crop`` and
        ``output_size``)."""
        return self.session().run(None, dict(
            extra, **{self.meta['input_name']: inputs}))
