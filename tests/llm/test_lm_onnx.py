"""A language model's export folder per bit: ONNX Runtime's MatMulNBits
(and the exact QDQ graph) give PyTorch's logits and the same greedy
continuation at every bit, from one graph holding the stored integers; the
N-bit packing against a reference written here."""
import tempfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import mmdrq
from mmdrq.deploy.pipeline import export_to_folder
from mmdrq.quantization import use_setting
from mmdrq_runtime.generation import empty_cache, generate, generate_cached
from mmdrq_runtime.nbits import code_bits, matmul_nbits, pack_codes
from mmdrq_runtime.session import SwitchableSession, make_session

pytest.importorskip('transformers')

from mmdrq.llm import CausalLM  # noqa: E402

TINY = dict(model_type='llama', vocab_size=96, hidden_size=48,
            intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False)
BITS = (8, 6, 4, 2)


def unpack_reference(packed, bits, k):
    """Codes of ``pack_codes``'s bytes, element by element."""
    n, blocks, blob = packed.shape
    flat = packed.reshape(n, -1)
    codes = np.zeros((n, flat.shape[1] * 8 // bits), np.int64)
    for j in range(codes.shape[1]):
        byte, slot = divmod(j * bits, 8)
        codes[:, j] = (flat[:, byte].astype(np.int64) >> slot) & \
            ((1 << bits) - 1)
    return codes[:, :k]


@pytest.mark.parametrize('bit', [8, 6, 4, 3, 2])
@pytest.mark.parametrize('k', [32, 50])
def test_packed_codes_dequantize_to_the_container_values(bit, k):
    rng = np.random.default_rng()
    n = 7
    q = rng.integers(-(1 << (bit - 1)), 1 << (bit - 1), (n, k))
    q[0, :3] = [-(1 << (bit - 1)), (1 << (bit - 1)) - 1, 0]  # range ends
    container = (q << (8 - bit)).astype(np.int8)
    bits = code_bits(container)
    assert bits == {8: 8, 6: 8, 4: 4, 3: 4, 2: 2}[bit]
    packed, factor = pack_codes(container, bits, 16)
    assert packed.shape == (n, -(-k // 16), 16 * bits // 8)
    codes = unpack_reference(packed, bits, k)
    # (code - 2**(bits-1)) * scale * factor == container * scale
    assert np.array_equal((codes - (1 << (bits - 1))) * factor, container)
    padding = unpack_reference(packed, bits, packed.shape[1] * 16)[:, k:]
    assert np.all(padding == 1 << (bits - 1))  # pads dequantize to 0


def test_pack_codes_refuses_what_the_op_cannot_hold():
    with pytest.raises(ValueError, match='bits must be one of .* got 6'):
        pack_codes(np.zeros((2, 16), np.int8), 6, 16)
    with pytest.raises(ValueError, match='power of two >= 16, got 24'):
        pack_codes(np.zeros((2, 16), np.int8), 4, 24)


def test_matmul_nbits_session_against_float64():
    rng = np.random.default_rng()
    n, k = 24, 40
    container = (rng.integers(-8, 8, (n, k)) << 4).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32)
    bias = rng.normal(size=n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node('DequantizeLinear', ['w', 's', 'z'], ['wf'],
                          axis=0),
         helper.make_node('Gemm', ['x', 'wf', 'b'], ['y'], transB=1)], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['m', k])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['m', n])],
        [numpy_helper.from_array(container, 'w'),
         numpy_helper.from_array(scale, 's'),
         numpy_helper.from_array(np.zeros(n, np.int8), 'z'),
         numpy_helper.from_array(bias, 'b')])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid('', 20)])
    rewritten = matmul_nbits(onnx.ModelProto.FromString(
        model.SerializeToString()))
    assert [(node.op_type, node.domain) for node in rewritten.graph.node] \
        == [('MatMulNBits', 'com.microsoft'), ('Add', '')]
    x = rng.normal(size=(5, k)).astype(np.float32)
    got = make_session(model, kernels='nbits').run(None, {'x': x})[0]
    want = x.astype(np.float64) @ (container * scale[:, None].astype(
        np.float64)).T + bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_weight_read_by_two_gemms_is_packed_once():
    n = k = 32  # y1 (m, n) is the second Gemm's input
    container = (np.arange(n * k).reshape(n, k) % 16 - 8).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node('DequantizeLinear', ['w', 's'], ['wf'], axis=0),
         helper.make_node('Gemm', ['x', 'wf'], ['y1'], transB=1),
         helper.make_node('Gemm', ['y1', 'wf'], ['y2'], transB=1)], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['m', k])],
        [helper.make_tensor_value_info('y2', TensorProto.FLOAT, ['m', n])],
        [numpy_helper.from_array(container, 'w'),
         numpy_helper.from_array(np.full(n, 0.1, np.float32), 's')])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid('', 20)])
    rewritten = matmul_nbits(onnx.ModelProto.FromString(
        model.SerializeToString()))
    onnx.checker.check_model(rewritten, full_check=True)
    assert [i.name for i in rewritten.graph.initializer] == \
        ['wf.nbits', 'wf.nbits_scales']
    x = np.random.default_rng().normal(size=(3, k)).astype(np.float32)
    weight = container.astype(np.float64) * 0.1
    want = (x.astype(np.float64) @ weight.T) @ weight.T
    got = make_session(model, kernels='nbits').run(None, {'x': x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A tiny converted Llama (weight-only, LM head FP) exported at every
    bit into one folder."""
    torch.manual_seed(0)
    model = mmdrq.quantize_model(CausalLM(TINY), bits=list(BITS),
                                 act_quantizer=None, skip_first_last=False,
                                 skip=[r'lm\.lm_head'])
    model.train()
    model(torch.randint(0, TINY['vocab_size'], (4, 16)), mode='tensor')
    model.eval()
    folder = str(tmp_path_factory.mktemp('lm') / 'onnx')
    meta = export_to_folder(model, folder, list(BITS), input_shape=(1, 16),
                            graph='tensor')
    return model, folder, meta


def test_one_graph_serves_every_bit(exported):
    model, folder, meta = exported
    assert sorted(meta['files']) == ['model.onnx']  # no per-bit values
    assert meta['input_dims'] == [None, None]  # batch and length dynamic
    assert meta['input_dtype'] == 'int64'
    assert meta['pipeline']['extra_inputs'] == ['past_keys', 'past_values']
    assert meta['pipeline']['cache_shape'] == [2, 2, 24]


def run_step(session, ids, keys=None, values=None):
    """(logits, keys, values) of the exported step; no cache: empty."""
    if keys is None:
        keys, values = empty_cache(session.meta['pipeline']['cache_shape'],
                                   len(ids)).values()
    return session.run(np.asarray(ids), past_keys=keys, past_values=values)


def test_the_cached_step_continues_a_sequence_as_the_whole_would(exported):
    """A prompt through the step, then one token at a time on the cache:
    the logits of the whole sequence at once."""
    model, folder, _ = exported
    session = SwitchableSession(folder, kernels='nbits').set_bits(4)
    ids = torch.randint(0, TINY['vocab_size'], (2, 9))
    with use_setting(model, 4), torch.no_grad():
        want = model(ids, mode='tensor').numpy()
    logits, keys, values = run_step(session, ids[:, :6].numpy())
    parts = [logits]
    for t in range(6, 9):
        logits, keys, values = run_step(session, ids[:, t:t + 1].numpy(),
                                        keys, values)
        parts.append(logits)
    assert keys.shape == (2, 2, 2, 9, 24)
    np.testing.assert_allclose(np.concatenate(parts, 1), want, rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize('kernels', ['nbits', 'exact'])
def test_onnxruntime_logits_and_greedy_text_equal_pytorch(exported,
                                                          kernels):
    model, folder, _ = exported
    session = SwitchableSession(folder, kernels=kernels)
    prompt = torch.randint(0, TINY['vocab_size'], (1, 5)).tolist()[0]
    ids = torch.randint(0, TINY['vocab_size'], (2, 11))
    for bit in BITS:
        session.set_bits(bit)
        if kernels == 'nbits':  # the bit's packed width: 6 bits in 8
            nodes = [n for n in matmul_nbits(
                session.export.model(bit)).graph.node
                if n.op_type == 'MatMulNBits']
            widths = {a.i for n in nodes for a in n.attribute
                      if a.name == 'bits'}
            assert len(nodes) == 14 and widths == {8: {8}, 6: {8}, 4: {4},
                                                   2: {2}}[bit]
        with use_setting(model, bit), torch.no_grad():
            want = model(ids, mode='tensor').numpy()

            def torch_logits(window):
                return model(torch.from_numpy(window), mode='tensor').numpy()
            want_text = generate(torch_logits, prompt, 12, 8)
        got = run_step(session, ids.numpy())[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        # on the cache, past the 8-token window too
        got_text = generate_cached(
            lambda *feeds: run_step(session, *feeds),
            session.meta['pipeline']['cache_shape'], prompt, 12, 8)
        assert got_text == want_text


@pytest.mark.parametrize('args, message', [
    (dict(prompt=[], count=3, context=4), 'a prompt of at least one'),
    (dict(prompt=[1], count=-1, context=4), 'count must be >= 0'),
    (dict(prompt=[1], count=3, context=0), 'context >= 1'),
    (dict(prompt=[1], count=3, context=4, temperature=-1),
     'temperature must be >= 0'),
])
def test_generate_refuses_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        generate(lambda ids: None, **args)


def test_generate_reads_at_most_context_tokens_and_samples_by_seed():
    seen = []

    def logits(ids):  # favours the token after the last one
        seen.append(ids.shape[1])
        out = np.zeros((1, ids.shape[1], 10))
        out[0, -1, (ids[0, -1] + 1) % 10] = 5.0
        return out
    assert generate(logits, [3, 4], 5, context=3) == [5, 6, 7, 8, 9]
    assert seen == [2, 3, 3, 3, 3]
    drawn = [generate(logits, [0], 20, 3, temperature=5.0, seed=s)
             for s in (1, 1, 2)]
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]


def test_int8_input_kernels_stay_close_to_pytorch(exported):
    """``nbits_int8``: MatMulNBits with accuracy_level 4 (each block of the
    input quantized to int8 when it runs): not equal, but within the
    input's 8-bit rounding of PyTorch's logits."""
    model, folder, _ = exported
    session = SwitchableSession(folder, kernels='nbits_int8')
    nodes = [n for n in matmul_nbits(session.export.model(4),
                                     accuracy_level=4).graph.node
             if n.op_type == 'MatMulNBits']
    assert {a.i for n in nodes for a in n.attribute
            if a.name == 'accuracy_level'} == {4}
    ids = torch.randint(0, TINY['vocab_size'], (2, 11))
    for bit in BITS:
        with use_setting(model, bit), torch.no_grad():
            want = model(ids, mode='tensor').numpy()
        got = run_step(session.set_bits(bit), ids.numpy())[0]
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_a_product_it_cannot_rewrite_is_named():
    container = np.zeros((16, 8), np.int8)  # (K, N): x @ w, no transB
    graph = helper.make_graph(
        [helper.make_node('DequantizeLinear', ['w', 's'], ['wf']),
         helper.make_node('Gemm', ['x', 'wf'], ['y'], name='head')], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['m', 16])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['m', 8])],
        [numpy_helper.from_array(container, 'w'),
         numpy_helper.from_array(np.float32(0.1), 's')])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid('', 20)])
    with pytest.warns(UserWarning, match=r"1 products .* \['head'\]"):
        rewritten = matmul_nbits(model)
    assert [n.op_type for n in rewritten.graph.node] == \
        ['DequantizeLinear', 'Gemm']


def test_the_float_head_is_stored_as_fp_layers_says(exported):
    """The FP LM head (a Linear on 3-d input) is a Gemm on its named
    weight, so ``fp_layers='float16'`` stores it in half precision."""
    model, _, _ = exported
    with tempfile.TemporaryDirectory() as tmp:
        export_to_folder(model, tmp + '/onnx', [4], input_shape=(1, 16),
                         graph='tensor', fp_layers='float16')
        session = SwitchableSession(tmp + '/onnx', kernels='exact')
        inits = {t.name: numpy_helper.to_array(t)
                 for t in session.export.model(4).graph.initializer}
        head = model.lm.lm_head.weight.detach().numpy()
        np.testing.assert_array_equal(
            inits['model.lm.lm_head.weight_fp16'], head.astype(np.float16))
        assert 'model.lm.lm_head.weight' not in inits
        ids = torch.randint(0, TINY['vocab_size'], (2, 11))
        with use_setting(model, 4), torch.no_grad():
            want = model(ids, mode='tensor').numpy()
        got = run_step(session.set_bits(4), ids.numpy())[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)


def test_every_option_quantized_exports_per_bit():
    """The LM head and the token embeddings quantized too, every Linear's
    input at 8 bits (``ActQuantizer(fixed_bit=8)``) whatever its weights'
    bit: ONNX Runtime's logits (QDQ and MatMulNBits) equal PyTorch's at
    every bit, from the one graph."""
    # fixed weights and ids: on some draws an 8-bit input sits at a
    # rounding boundary and flips with the float summation order (3e-3 on
    # one position's logits, seen once unseeded)
    torch.manual_seed(0)
    model = mmdrq.quantize_model(
        CausalLM(TINY), bits=list(BITS), skip_first_last=False,
        embeddings=True,
        act_quantizer=dict(type='ActQuantizer', fixed_bit=8))
    model.train()
    model(torch.randint(0, TINY['vocab_size'], (4, 16)), mode='tensor')
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        meta = export_to_folder(model, tmp + '/onnx', list(BITS),
                                input_shape=(1, 16), graph='tensor')
        assert sorted(meta['files']) == ['model.onnx']
        ids = torch.randint(0, TINY['vocab_size'], (2, 11))
        for kernels in ('exact', 'nbits'):
            session = SwitchableSession(tmp + '/onnx', kernels=kernels)
            for bit in BITS:
                graph = session.export.model(bit).graph
                tops = [numpy_helper.to_array(t) for t in graph.initializer
                        if t.name.endswith('.input_max')]
                # 7 Linear layers x 2 blocks + the head, all at 8 bits
                assert len(tops) == 15 and {int(t) for t in tops} == {127}
                made_by = {o: n.op_type for n in graph.node for o in n.output}
                gathers = [n for n in graph.node if n.op_type == 'Gather'
                           and made_by.get(n.input[0]) == 'DequantizeLinear']
                assert len(gathers) == 1  # the embedding table
                with use_setting(model, bit), torch.no_grad():
                    want = model(ids, mode='tensor').numpy()
                got = run_step(session.set_bits(bit), ids.numpy())[0]
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
