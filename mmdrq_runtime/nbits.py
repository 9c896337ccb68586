"""Weight-only linears as ONNX Runtime's N-bit MatMul (``MatMulNBits``).

A quantized linear of an export is ``Gemm(x, DequantizeLinear(w), b,
transB=1)`` with the bit's integers in the int8 container (``q *
2**(8 - b)``) and one scale per output channel. ONNX Runtime's contrib op
``com.microsoft.MatMulNBits`` holds 2-, 4- or 8-bit unsigned codes packed
along K, low bits first, in blocks with a scale each, and dequantizes
``(code - 2**(bits - 1)) * scale`` (its default zero point). The rewrite
packs each weight into the narrowest of those widths that holds its
integers exactly (6 bits go into 8; a 4-bit weight whose integers are all
even could go into fewer, which is still exact), with the channel's scale in
every block, so the product is the same weights' product: equal to the
Gemm's up to float summation order. It reads the values, so it runs on a
setting's filled graph, not on a template shared by several settings.
"""
import warnings
from typing import Optional

import numpy as np

CODE_BITS = (2, 4, 8)
CONTAINER_BIT = 8
DOMAIN = 'com.microsoft'


def code_bits(container: np.ndarray) -> int:
    """The narrowest MatMulNBits width holding the int8 container's
    integers exactly (its values are multiples of ``2**(8 - bits)``)."""
    values = np.asarray(container, np.int8)
    for bits in CODE_BITS:
        if not np.any(values & np.int8((1 << (CONTAINER_BIT - bits)) - 1)):
            return bits
    return CONTAINER_BIT


def pack_codes(container: np.ndarray, bits: int, block_size: int):
    """``(B, scale factor)`` of a ``(N, K)`` int8 container weight: uint8
    ``B`` of shape ``(N, ceil(K / block_size), block_size * bits / 8)``
    (codes ``q + 2**(bits - 1)``, low bits first along K, padded with the
    zero point) and the factor ``2**(8 - bits)`` of the container's scale
    that the codes' scale carries."""
    if bits not in CODE_BITS:
        raise ValueError(f'MatMulNBits bits must be one of {CODE_BITS}, got '
                         f'{bits}')
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f'block_size must be a power of two >= 16, got '
                         f'{block_size}')
    values = np.asarray(container, np.int8)
    n, k = values.shape
    blocks = -(-k // block_size)
    zero = 1 << (bits - 1)
    codes = np.full((n, blocks * block_size), zero, np.uint8)
    codes[:, :k] = (values.astype(np.int16) >> (CONTAINER_BIT - bits)) + zero
    per_byte = 8 // bits
    codes = codes.reshape(n, -1, per_byte)
    packed = np.zeros(codes.shape[:2], np.uint8)
    for index in range(per_byte):  # element k's code in bits k*bits..
        packed |= codes[:, :, index] << (index * bits)
    return packed.reshape(n, blocks, block_size * bits // 8), \
        float(2**(CONTAINER_BIT - bits))


# ONNX Runtime's CPU MatMulNBits: 4 bits since 1.17, 8 and 2 bits since
# 1.23 (older ones refuse those sessions without naming the layer)
MIN_ORT = (1, 23)


def check_runtime():
    """An error naming the installed ONNX Runtime if it is too old for
    every width of ``CODE_BITS``."""
    import onnxruntime
    version = tuple(int(p) for p in onnxruntime.__version__.split('.')[:2])
    if version < MIN_ORT:
        raise RuntimeError(
            f'MatMulNBits kernels need onnxruntime >= '
            f'{".".join(map(str, MIN_ORT))} (2- and 8-bit weights), '
            f'found {onnxruntime.__version__}')


def matmul_nbits(proto, block_size: int = 128,
                 accuracy_level: Optional[int] = None):
    """Rewrite (in place, and return) every ``Gemm(x, DequantizeLinear(w),
    c, transB=1)`` whose weight is an int8 initializer with zero point 0
    and one scale per output channel (or per tensor) into
    ``MatMulNBits(x, B, scales)`` followed by ``Add(c)`` (dropped when
    ``c`` is zero). Returns the proto; ``accuracy_level`` is the op's
    (ONNX Runtime's default when None: float computation)."""
    from onnx import helper, numpy_helper
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}

    def array(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    def weight_dq(node):
        attrs = {a.name: helper.get_attribute_value(a)
                 for a in node.attribute}
        if node.op_type != 'Gemm' or attrs.get('transB') != 1 or \
                attrs.get('transA', 0) != 0 or \
                attrs.get('alpha', 1.0) != 1.0 or \
                attrs.get('beta', 1.0) != 1.0:
            return None
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != 'DequantizeLinear':
            return None
        weight, scale = array(dq.input[0]), array(dq.input[1])
        zero = array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] \
            else np.zeros(1, np.int8)
        axis = {a.name: a.i for a in dq.attribute}.get('axis', 1)
        if weight is None or weight.dtype != np.int8 or weight.ndim != 2 or \
                scale is None or zero is None or np.any(zero) or \
                (scale.size != 1 and (axis != 0 or
                                      scale.size != weight.shape[0])):
            return None
        return dq, weight, scale

    new_nodes, extra, packed_bits, kept = [], [], {}, []
    for node in graph.node:
        found = weight_dq(node)
        if found is None:
            new_nodes.append(node)
            source = producers.get(node.input[1]) \
                if node.op_type in ('Gemm', 'MatMul') else None
            if source is not None and source.op_type == 'DequantizeLinear':
                kept.append(node.name or node.output[0])
            continue
        dq, weight, scale = found
        n, k = weight.shape
        name = dq.output[0]  # one packed weight per DQ (a layer called twice)
        if name not in packed_bits:
            packed_bits[name] = bits = code_bits(weight)
            packed, factor = pack_codes(weight, bits, block_size)
            scales = np.broadcast_to(
                scale.astype(np.float32).reshape(-1, 1) * np.float32(factor),
                (n, packed.shape[1])).reshape(-1)
            extra += [numpy_helper.from_array(packed, name + '.nbits'),
                      numpy_helper.from_array(np.ascontiguousarray(scales),
                                              name + '.nbits_scales')]
        bits = packed_bits[name]
        bias = node.input[2] if len(node.input) > 2 else ''
        keep_bias = bias and (bias not in inits or np.any(array(bias)))
        out = node.output[0]
        attrs = dict(K=k, N=n, bits=bits, block_size=block_size)
        if accuracy_level is not None:
            attrs['accuracy_level'] = accuracy_level
        new_nodes.append(helper.make_node(
            'MatMulNBits', [node.input[0], name + '.nbits',
                            name + '.nbits_scales'],
            [out + '_nbits' if keep_bias else out], domain=DOMAIN,
            name=(node.name or out) + '_nbits', **attrs))
        if keep_bias:
            new_nodes.append(helper.make_node(
                'Add', [out + '_nbits', bias], [out],
                name=(node.name or out) + '_bias'))
    if kept:
        warnings.warn(f'MatMulNBits: {len(kept)} products of a quantized '
                      f'weight stay as they are (not a Gemm x @ w.T on an '
                      f'int8 weight with a scale per output channel), e.g. '
                      f'{kept[:3]}')
    if not extra:
        return proto
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(extra)
    used = {i for n in graph.node for i in n.input}
    kept = [n for n in graph.node if n.op_type != 'DequantizeLinear' or
            any(o in used for o in n.output) or
            any(o == g.name for o in n.output for g in graph.output)]
    del graph.node[:]
    graph.node.extend(kept)
    used = {i for n in graph.node for i in n.input} | \
        {o.name for o in graph.output}
    kept_inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return proto
