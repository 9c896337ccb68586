"""ONNX Runtime sessions over an export folder, switchable by bit."""
from typing import Optional, Union

import numpy as np

from .artifact import ExportFolder, copy_model
from .nbits import check_runtime, matmul_nbits


KERNELS = ('exact', 'integer', 'nbits', 'nbits_int8')
# MatMulNBits' accuracy_level per kernels: ONNX Runtime's default (float
# computation) or 4 (each block of the input quantized to int8 at run time)
NBITS_ACCURACY = {'nbits': None, 'nbits_int8': 4}
# ONNX Runtime passes that would fold the integer graph's per-channel Mul
# and Add back into a conv's weights or a Gemm's alpha (one more rounding)
EXACT_DISABLED_OPTIMIZERS = ('ConvMulFusion', 'ConvAddFusion',
                             'ConvBNFusion', 'MatMulScaleFusion',
                             'MatMulAddFusion')


def make_session(model, threads: Optional[int] = None,
                 kernels: str = 'exact', optimized_path: str = None,
                 prepared: bool = False):
    """A CPU ONNX Runtime session of ``model`` (a path, serialized bytes or
    a ModelProto, which may be changed in place; ``prepared``: already
    through ``prepare`` for these kernels).

    ``kernels='exact'`` runs the quantized convolutions and linears on
    integers (``integer_sums``) with ONNX Runtime's QDQ fusion off
    (``session.disable_quant_qdq``) and without the passes that would fold
    the scaling back into the weights: outputs are those of PyTorch under
    ``mmdrq.quantization.deploy_numerics`` (see there). ``'integer'`` lets
    it fuse DequantizeLinear -> Conv -> QuantizeLinear into integer kernels
    (QLinearConv): faster, but its int32 bias (the folded BN shift rounded
    to input scale times weight scale) and its requantization differ from
    the float computation, which flips some low-bit activations.
    ``'nbits'`` runs the quantized linears as ``MatMulNBits`` (2-, 4- or
    8-bit packed weights, float input: ``mmdrq_runtime.nbits``), the rest
    as ``'exact'`` does without the integer sums: the weight-only kernels
    of language-model deployment, equal to the float computation up to
    summation order. ``'nbits_int8'``: the same with the op's
    ``accuracy_level=4``, which quantizes each block of a linear's input
    to int8 when it runs (integer dot products: several times faster on
    the CPU at 8 and 2 bits, not equal to the float computation).
    """
    import onnxruntime as ort
    check_kernels(kernels)
    options = ort.SessionOptions()
    options.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    disabled = []
    proto = _load(model)
    if not prepared:
        proto = prepare(proto, kernels)
    if kernels in NBITS_ACCURACY:  # reads the weights: the setting's, filled
        check_runtime()
        proto = matmul_nbits(proto,
                             accuracy_level=NBITS_ACCURACY[kernels])
    if kernels != 'integer':
        options.add_session_config_entry('session.disable_quant_qdq', '1')
        disabled = list(EXACT_DISABLED_OPTIMIZERS)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=['CPUExecutionProvider'],
                                disabled_optimizers=disabled)


def check_kernels(kernels: str):
    if kernels not in KERNELS:
        raise ValueError(f'kernels must be one of {list(KERNELS)}, got '
                         f'{kernels!r}')


def _load(model):
    import onnx
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.ModelProto.FromString(bytes(model))
    return onnx.load(model)  # external data next to the file too


def prepare(proto, kernels: str = 'exact', clips=None):
    """The session's graph (``proto`` changed in place): the ``clips``
    (Clip output names; by default those clipping nothing) dropped, and
    for ``kernels='exact'`` the integer sums (``integer_sums``)."""
    drop_clips(proto, identity_clips(proto.graph) if clips is None
               else clips)
    return integer_sums(proto) if kernels == 'exact' else proto


def integer_sums(proto):
    """Rewrite (in place, and return) every Conv/Gemm whose input and
    weight both come from a DequantizeLinear with zero point 0 (a quantized
    layer of the export) to sum the integers: both DequantizeLinear with
    scale 1, no bias, then ``Mul(alpha)`` and ``Add(bias)`` per output
    channel. ``alpha = input scale * weight scale`` is a float32 Mul of the
    two scale initializers, which ONNX Runtime folds at session creation:
    the exact product of two float32 rounded once to float32, as
    ``deploy_numerics`` computes it. The rewrite reads shapes, never
    values, so one rewritten graph serves every setting of a folder."""
    from onnx import helper, numpy_helper
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def size(name):
        return int(np.prod(inits[name].dims)) if name in inits else None

    def dequantized(name):
        """The DequantizeLinear giving ``name`` from an initializer scale
        and a zero zero point, else None."""
        node = producers.get(name)
        if node is None or node.op_type != 'DequantizeLinear' or \
                node.input[1] not in inits:
            return None
        if len(node.input) > 2 and (
                node.input[2] not in inits or
                np.any(numpy_helper.to_array(inits[node.input[2]]))):
            return None
        return node

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
        if x_dq is None or w_dq is None or w_dq.input[0] not in inits or \
                size(x_dq.input[1]) != 1:
            return None
        axis = {a.name: a.i for a in w_dq.attribute}.get('axis', 1)
        return (x_dq, w_dq) if size(w_dq.input[1]) == 1 or axis == 0 \
            else None

    one, view = 'mmdrq.integer_sums.one', 'mmdrq.integer_sums.view'
    new_nodes, made, constants = [], set(), {}
    for node in graph.node:
        pair = factors(node)
        if pair is None:
            new_nodes.append(node)
            continue
        x_dq, w_dq = pair
        name, out = node.name or node.output[0], node.output[0]
        weight = inits[w_dq.input[0]]
        rank = len(weight.dims) - 2 if node.op_type == 'Conv' else 0
        shape = f'{view}{rank}'
        constants[shape] = np.array([-1] + [1] * rank, np.int64)
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
        else:
            bias = name + '.zero_bias'
            constants[bias] = np.zeros(weight.dims[0], np.float32)
        for index, dq in enumerate((x_dq, w_dq)):
            if dq.output[0] + '_int' not in made:  # a weight used twice
                made.add(dq.output[0] + '_int')
                new_nodes.append(helper.make_node(
                    'DequantizeLinear', [dq.input[0], one],
                    [dq.output[0] + '_int'], name=dq.name + '_int'))
            node.input[index] = dq.output[0] + '_int'
        del node.input[2:]
        node.output[0] = out + '_int_sum'
        new_nodes += [
            helper.make_node('Mul', [x_dq.input[1], w_dq.input[1]],
                             [name + '.alpha_flat'], name=name + '.alpha'),
            helper.make_node('Reshape', [name + '.alpha_flat', shape],
                             [name + '.alpha_view'],
                             name=name + '.alpha_view'),
            helper.make_node('Reshape', [bias, shape], [name + '.beta'],
                             name=name + '.beta'),
            node,
            helper.make_node('Mul', [out + '_int_sum', name + '.alpha_view'],
                             [out + '_scaled'], name=name + '.mul_alpha'),
            helper.make_node('Add', [out + '_scaled', name + '.beta'],
                             [out], name=name + '.add_beta')]
    if made:
        constants[one] = np.array(1.0, np.float32)
    graph.initializer.extend(numpy_helper.from_array(value, key)
                             for key, value in constants.items())
    used = {i for n in new_nodes for i in n.input} | \
        {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in new_nodes  # the float DQs now unused
                      if n.op_type != 'DequantizeLinear' or
                      n.output[0] in used)
    _drop_unused_initializers(graph)
    return proto


def identity_clips(graph, values=None) -> frozenset:
    """Output names of the integer Clips between a QuantizeLinear and its
    DequantizeLinear whose bounds are the whole container (``values``:
    bounds by initializer name, before the graph's own): the stored graph
    clips every bit to its range, which at 8 bits clips nothing and would
    only keep ONNX Runtime from fusing."""
    from onnx import numpy_helper
    values = values or {}
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def bound(name):
        if name in values:
            return np.asarray(values[name])
        return numpy_helper.to_array(inits[name]) if name in inits else None

    found = set()
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == 'Clip' \
            else None
        if source is None or source.op_type != 'QuantizeLinear' or \
                len(node.input) != 3:
            continue
        low, high = (bound(n) for n in node.input[1:])
        if low is None or high is None or low.dtype.kind not in 'iu':
            continue
        info = np.iinfo(low.dtype)
        if low == info.min and high == info.max:
            found.add(node.output[0])
    return frozenset(found)


def clip_bounds(graph, clips) -> set:
    """Initializer names of the bounds of the Clips named (outputs)."""
    return {i for node in graph.node if node.op_type == 'Clip' and
            node.output[0] in clips for i in node.input[1:]}


def drop_clips(proto, clips):
    """Remove (in place, and return) the Clips whose outputs are named:
    their readers read the Clip's input."""
    graph = proto.graph
    if any(output.name in clips for output in graph.output):
        raise ValueError('a graph output is a Clip of a QuantizeLinear')
    rename = {node.output[0]: node.input[0] for node in graph.node
              if node.op_type == 'Clip' and node.output[0] in clips}
    keep = [node for node in graph.node if node.output[0] not in rename]
    for node in keep:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_initializers(graph)
    return proto


def drop_identity_clips(proto):
    """``drop_clips`` of the ``identity_clips``."""
    return drop_clips(proto, identity_clips(proto.graph))


def _drop_unused_initializers(graph):
    used = {i for n in graph.node for i in n.input} | \
        {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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
        check_kernels(kernels)
        self.folder = folder
        self.export = ExportFolder(folder)
        self.meta = self.export.meta
        self.threads, self.kernels = threads, kernels
        self.sessions, self.templates = {}, {}
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
        """The current setting's session (made now if it was not yet).

        Settings rebuilt from the stored graph share its rewritten form
        (``prepare``, done once for each set of Clips a setting drops):
        a setting's session only takes its values and derived integers."""
        key = self.current
        if key in self.sessions:
            return self.sessions[key]
        if self.export.entry(key).get('file') is not None:
            session = make_session(self.export.model(key), self.threads,
                                   self.kernels)
        else:
            stored = self.export.graph()
            values = self.export.values(key)
            clips = identity_clips(stored.graph, values)
            if clips not in self.templates:
                self.templates[clips] = prepare(copy_model(stored),
                                                self.kernels, clips)
            proto = self.export.fill(copy_model(self.templates[clips]), key,
                                     values, clip_bounds(stored.graph, clips))
            session = make_session(proto, self.threads, self.kernels,
                                   prepared=True)
        self.sessions[key] = session
        return session

    def run(self, inputs: np.ndarray, **extra: np.ndarray) -> list:
        """Outputs (flat list of arrays) at the current bits; ``extra``:
        a pipeline graph's other inputs (a segmentor's ``crop`` and
        ``output_size``)."""
        return self.session().run(None, dict(
            extra, **{self.meta['input_name']: inputs}))
