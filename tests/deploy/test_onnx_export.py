"""Per-bit ONNX export: the integers ONNX Runtime sees equal PyTorch's, the
weights are the stored integers after the second rounding, BN folds, and bad
input is refused before anything is written."""
import os
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

pytest.importorskip('onnxruntime')

from mmdrq import quantize_model, set_bits, use_bits  # noqa: E402
from mmdrq.deploy import (OnnxExporter, SwitchableSession,  # noqa: E402
                          export_to_folder, make_session, read_meta)
from conftest import calibrate, plain

BITS = (8, 6, 4, 2)


def single_conv(signed: bool):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))
    quantize_model(model, bits=list(BITS), skip_first_last=False,
                   act_quantizer=dict(type='ActQuantizer', signed=signed))
    return calibrate(model, (2, 4, 5, 5))


def run_with_output(proto, name, x):
    """Run ``proto`` (exact kernels) with tensor ``name`` as an extra
    output."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = make_session(proto.SerializeToString())
    return session.run([name], {'input': x.numpy()})[0]


@pytest.mark.parametrize('target', ['onnxruntime', 'tensorrt'])
@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('bit', BITS)
def test_input_integers_equal_pytorch_ties_included(signed, bit, target):
    torch.manual_seed(bit)
    model = single_conv(signed)
    layer = model[0]
    act = layer.act_quantizer
    index = BITS.index(bit)
    act.scale.data[index] = 2.0**-4  # x / s exact: ties are exact ties
    lo, hi = (-(2**(bit - 1)), 2**(bit - 1) - 1) if signed else \
        (0, 2**bit - 1)
    # ties k + 0.5 across and beyond the range, plus random values
    ties = (torch.arange(2 * lo - 3, 2 * hi + 4) + 0.5) * 2.0**-4
    x = torch.cat([ties, torch.randn(200 - ties.numel() % 100) * hi / 16])
    x = x[:(x.numel() // 100) * 100].reshape(-1, 4, 5, 5)
    exporter = OnnxExporter(model, x.shape, plain, target)
    if target == 'tensorrt' and not signed and bit == 8:
        with pytest.raises(ValueError, match='do not fit TensorRT'):
            exporter.export(bit)
        return
    proto = exporter.export(bit)
    clipped = target == 'onnxruntime' and bit < 8
    got = run_with_output(proto, '0.input_q' +
                          ('_clipped' if clipped else ''), x)
    reference = np.clip(np.rint(x.numpy().astype(np.float32) /
                                np.float32(2.0**-4)), lo, hi)
    signed_container = signed or target == 'tensorrt'
    assert got.dtype == (np.int8 if signed_container else np.uint8)
    np.testing.assert_array_equal(got.astype(np.float64), reference)
    with torch.no_grad():
        torch_q = act(x, bit) / act.scale[index]
    np.testing.assert_array_equal(got.astype(np.float64), torch_q.numpy())


@pytest.mark.parametrize('rounding', ['half_even', 'half_up'])
def test_weight_initializer_is_second_rounding_of_stored_integers(rounding):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    quantize_model(model, bits=list(BITS), skip_first_last=False,
                   weight_quantizer=dict(type='DoubleRoundingQuantizer',
                                         rounding=rounding))
    calibrate(model, (2, 4, 5, 5))
    layer = model[0]
    quantizer = layer.weight_quantizer
    scale = quantizer.scale.detach()[0].double()
    # stored integers spanning INT8 (ties of every shift included)
    q_h = torch.arange(-128, 128).repeat(2)[:layer.weight.numel()]
    layer.weight.data = (q_h.double().reshape(layer.weight.shape) *
                         scale.view(-1, 1, 1, 1)).float()
    exporter = OnnxExporter(model, (1, 4, 5, 5), plain)
    for bit in BITS:
        proto = exporter.export(bit)
        inits = {i.name: numpy_helper.to_array(i)
                 for i in proto.graph.initializer}
        assert inits['0.weight_q'].dtype == np.int8
        stored = inits['0.weight_q'].astype(np.int64)
        align = 8 - bit
        assert (stored % 2**align == 0).all()
        d = 8 - bit
        exact = q_h.double().numpy() / 2**d
        rounded = np.rint(exact) if rounding == 'half_even' else \
            np.floor(exact + 0.5)
        want = np.clip(rounded, -(2**(bit - 1)), 2**(bit - 1) - 1)
        np.testing.assert_array_equal(stored.reshape(-1) >> align, want)
        np.testing.assert_allclose(
            inits['0.weight_scale'],
            (scale * 2.0**d / 2**align).numpy(), rtol=1e-7)


def test_model_equals_pytorch_every_bit_and_subnet(make_tiny_cnn):
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    exporter = OnnxExporter(model, (1, 3, 6, 6), plain)
    subnet = {'conv1': 2, 'conv2': 8, 'conv3': 4, 'fc1': 6}
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    exporter.skeleton()
    assert set(exporter.folded) == {'stem', 'conv1', 'conv2', 'conv3'}
    for setting in list(BITS) + [subnet]:
        proto = exporter.export(setting)
        ops = [n.op_type for n in proto.graph.node]
        assert 'BatchNormalization' not in ops
        assert ops.count('QuantizeLinear') == 4  # the quantized layers
        got = make_session(proto.SerializeToString()).run(
            None, {'input': x.numpy()})[0]
        with use_bits(model, setting), torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fp_layers_stay_float(make_tiny_cnn):
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    proto = OnnxExporter(model, (1, 3, 6, 6), plain).export(4)
    inits = {i.name: i for i in proto.graph.initializer}
    assert inits['model.stem.weight'].data_type == onnx.TensorProto.FLOAT
    assert inits['model.fc2.weight'].data_type == onnx.TensorProto.FLOAT
    assert inits['conv1.weight_q'].data_type == onnx.TensorProto.INT8


def test_folder_meta_session_and_reexport(make_tiny_cnn, tmp_path):
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    out = tmp_path / 'onnx'
    meta = export_to_folder(model, str(out), [8, 2], {'mixed': {'conv1': 2}},
                            (1, 3, 6, 6), plain)
    # one graph at the stored bit 8; the other settings' float values
    assert sorted(os.listdir(out)) == ['meta.json', 'mixed.npz',
                                       'model.onnx', 'w2a2.npz']
    assert meta == read_meta(str(out))
    assert [(e['name'], e['bit']) for e in meta['settings']] == [
        ('w8a8', 8), ('w2a2', 2), ('mixed', None)]
    assert meta['settings'][2]['layer_bits'] == {'conv1': 2}
    assert meta['settings'][2]['weight_bits'] == {'conv1.weight_q': 2}
    session = SwitchableSession(str(out))
    assert session.available == [8, 2, 'mixed'] and not session.sessions
    x = torch.randn(2, 3, 6, 6)
    for key in (2, 'mixed'):
        got = session.set_bits(key).run(x.numpy())[0]
        with use_bits(model, key if key == 2 else {'conv1': 2}), \
                torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4,
                                       atol=1e-5)
    assert list(session.sessions) == [2, 'mixed']  # made lazily
    with pytest.raises(ValueError, match="4 is not exported"):
        session.set_bits(4)
    # an earlier export is replaced; its files not in the new one go
    export_to_folder(model, str(out), [4], None, (1, 3, 6, 6), plain)
    assert sorted(os.listdir(out)) == ['meta.json', 'model.onnx',
                                       'w4a4.npz']
    assert SwitchableSession(str(out)).available == [4]


@pytest.mark.parametrize('case', ['bit', 'subnet', 'subnet_bit', 'folder',
                                  'unconverted', 'uninitialised'])
def test_bad_input_refused_before_writing(make_tiny_cnn, tmp_path, case):
    model = make_tiny_cnn()
    if case != 'unconverted':
        quantize_model(model, bits=list(BITS))
    if case not in ('unconverted', 'uninitialised'):
        calibrate(model, (4, 3, 6, 6))
    out = tmp_path / 'onnx'
    bits, subnets = [8], None
    errors = dict(bit=(ValueError, 'bit=3 is not one of the bits'),
                  subnet=(KeyError, "lacks: \\['nope'\\]"),
                  subnet_bit=(ValueError, 'bit=5 is not one of the bits'),
                  folder=(FileExistsError, 'holds other files'),
                  unconverted=(ValueError, 'no mmdrq quantized layers'),
                  uninitialised=(ValueError, 'no initialised quantizer'))
    if case == 'bit':
        bits = [8, 3]
    elif case == 'subnet':
        subnets = {'s': {'conv1': 2, 'nope': 4}}
    elif case == 'subnet_bit':
        subnets = {'s': {'conv1': 5}}
    elif case == 'folder':
        out.mkdir()
        (out / 'notes.txt').write_text('mine')
    before = sorted(os.listdir(tmp_path))
    error, match = errors[case]
    with pytest.raises(error, match=match):
        export_to_folder(model, str(out), bits, subnets, (1, 3, 6, 6), plain)
    assert sorted(os.listdir(tmp_path)) == before
    if case == 'folder':
        assert os.listdir(out) == ['notes.txt']


def test_bits_beyond_int8_refused(make_tiny_cnn):
    model = make_tiny_cnn()
    quantize_model(model, bits=[16, 8])
    generator = torch.Generator().manual_seed(0)
    model.train()
    for bit in (16, 8):
        set_bits(model, bit)
        model(torch.randn(2, 3, 6, 6, generator=generator))
    exporter = OnnxExporter(model.eval(), (1, 3, 6, 6), plain)
    with pytest.raises(ValueError, match='bit 16 does not fit'):
        exporter.export(16)
    ops = [n.op_type for n in exporter.export(8).graph.node]
    assert ops.count('QuantizeLinear') == 4


def test_tensorrt_rules(small_classifier):
    from mmdrq.deploy.tensorrt_rules import check_tensorrt_rules
    model = small_classifier()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (2, 3, 16, 16))

    def tensor(m, x):
        return m(x, mode='tensor')

    ort_graph = OnnxExporter(model, (1, 3, 16, 16), tensor).export(4)
    trt = OnnxExporter(model, (1, 3, 16, 16), tensor, 'tensorrt')
    broken = {rule for rule, nodes in check_tensorrt_rules(ort_graph).items()
              if nodes}
    # uint8 after ReLU, an integer Clip between Q and DQ, float residuals
    assert broken == {'signed_int8', 'q_then_dq', 'add_inputs_dequantized'}
    found = check_tensorrt_rules(trt.export(4))
    assert {rule for rule, nodes in found.items() if nodes} == \
        {'add_inputs_dequantized'}
    assert len(found['add_inputs_dequantized']) == 6  # one per block
    with pytest.raises(ValueError, match='do not fit TensorRT'):
        trt.export(8)


def test_layer_without_scales_in_the_graph_refused(make_tiny_cnn):
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    model.conv2.act_quantizer.initialized[1] = False
    model.conv2.act_quantizer._read_ready()
    exporter = OnnxExporter(model, (1, 3, 6, 6), plain)
    with pytest.raises(ValueError, match="layer 'conv2' has uninitialised"):
        exporter.export(6)


class _ReadsQkvWeight(nn.Module):
    """An owner reading its child's weight in its own code (as BEiT's
    ``F.linear(x, self.qkv.weight)``): PyTorch feeds that weight an FP
    input."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.qkv = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(nn.functional.linear(self.stem(x), self.qkv.weight,
                                              self.qkv.bias))


class _SelfAttention(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        x = self.stem(x)
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize('case', ['attention_matmuls', 'owner_read'])
def test_layer_the_export_cannot_express_refused_by_name(case):
    """Refused before any export work, with its name, the reason and the
    skip pattern that keeps it FP; skipped, the model exports."""
    if case == 'attention_matmuls':
        make, name, options = _SelfAttention, 'attn', \
            dict(attention_matmuls=True)
        error = (r"layer 'attn' \(QMultiheadAttention\) cannot be "
                 r"exported.*attention_matmuls=True.*skip=\['attn'\]")
        shape = (2, 3, 4)
    else:
        make, name, options = _ReadsQkvWeight, 'qkv', {}
        error = (r"layer 'qkv' \(QLinear\) cannot be exported.*read by "
                 r"the code of '\(model\)'.*skip=\['qkv'\]")
        shape = (2, 4)
    model = make()
    quantize_model(model, bits=BITS, skip_first_last=False, **options)
    with pytest.raises(ValueError, match=error):
        OnnxExporter(model, shape)
    model = make()
    quantize_model(model, bits=BITS, skip_first_last=False,
                   skip=[re.escape(name)], **options)
    calibrate(model, shape)
    x = torch.randn(shape)
    got = make_session(OnnxExporter(model, shape, plain).export(
        4).SerializeToString()).run(None, {'input': x.numpy()})[0]
    with use_bits(model, 4), torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4,
                                   atol=1e-5)
