"""Residual adds quantized with calibrated scales (every quantized conv an
integer kernel in ONNX Runtime, TensorRT's rules all held) and the storage
options of the layers kept FP."""
import os.path as osp
import tempfile

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

pytest.importorskip('onnxruntime')

from conftest import build_small_classifier, calibrate, plain  # noqa: E402
from mmdrq import quantize_model, use_bits  # noqa: E402
from mmdrq.deploy import OnnxExporter, make_session  # noqa: E402
from mmdrq.deploy.residual import residual_tensors  # noqa: E402
from mmdrq.deploy.tensorrt_rules import check_tensorrt_rules  # noqa: E402
from mmdrq.quantization import quantized_layers  # noqa: E402
from mmdrq.quantization.deploy_numerics import deploy_numerics  # noqa: E402,E501

BITS = (8, 6, 4, 2)

SHAPE = (1, 3, 16, 16)


def tensor(model, x):
    return model(x, mode='tensor')


@pytest.fixture(scope='module')
def classifier():
    """The digits ResNet (3 stages of 2 blocks: 6 residual adds, 14
    quantized convs) with initialised scales."""
    torch.manual_seed(0)
    model = build_small_classifier()
    quantize_model(model, bits=list(BITS))
    return calibrate(model, (2, 3, 16, 16))


@pytest.fixture(scope='module')
def calibrated(classifier):
    """Its exporter with calibrated residual Q/DQ (the float graph is
    exported once for every test)."""
    return OnnxExporter(classifier, SHAPE, tensor, residual_qdq='calibrated',
                        calibration=calibration_inputs())


def calibration_inputs():
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(3, *SHAPE[1:], generator=generator)
            for _ in range(2)]


def optimized_ops(proto) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'optimized.onnx')
        make_session(proto.SerializeToString(), 1, 'integer',
                     optimized_path=path)
        nodes = onnx.load(path).graph.node
    counts = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize('bit', [8, 2])
def test_every_quantized_conv_fuses_into_an_integer_kernel(
        classifier, calibrated, bit):
    model = classifier
    convs = sum(isinstance(m, torch.nn.Conv2d)
                for m in quantized_layers(model).values())
    assert convs == 14
    graphs = dict(none=OnnxExporter(model, SHAPE, tensor).export(bit),
                  calibrated=calibrated.export(bit))
    # the graph: each quantized conv reads a DQ and feeds (through its
    # ReLU) only QuantizeLinear; each residual Add reads DQs, feeds a Q
    graph = graphs['calibrated'].graph
    producers = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def readers(name):
        found = []
        for node in consumers.get(name, []):
            found += readers(node.output[0]) if node.op_type == 'Relu' \
                else [node.op_type]
        return found

    quantized_convs = [n for n in graph.node if n.op_type == 'Conv' and
                       producers.get(n.input[1]) is not None and
                       producers[n.input[1]].op_type == 'DequantizeLinear']
    assert len(quantized_convs) == convs
    for node in quantized_convs:
        assert producers[node.input[0]].op_type == 'DequantizeLinear'
        assert set(readers(node.output[0])) == {'QuantizeLinear'}, node.name
    adds = [n for n in graph.node if n.op_type == 'Add']
    assert len(adds) == 6
    for node in adds:
        assert {producers[i].op_type for i in node.input} == \
            {'DequantizeLinear'}
        assert set(readers(node.output[0])) == {'QuantizeLinear'}
    # what ONNX Runtime makes of it
    ops = {mode: optimized_ops(proto) for mode, proto in graphs.items()}
    assert ops['calibrated'].get('QLinearConv') == convs
    assert ops['calibrated'].get('QLinearAdd') == 6
    assert ops['none'].get('QLinearConv', 0) < convs  # what it fixes


def test_scales_are_the_calibrated_ranges(classifier, calibrated):
    """The last block's output (the backbone's output, after its ReLU) is
    quantized unsigned at max|x| / 255 over the calibration inputs, the
    conv outputs signed in uint8 with zero point 128."""
    model, inputs = classifier, calibration_inputs()
    for bit in (8, 4):
        proto = calibrated.export(bit)
        with use_bits(model, bit), torch.no_grad():
            largest = max(float(model.backbone(x)[-1].abs().max())
                          for x in inputs)
        graph = proto.graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        last_add = [n for n in graph.node if n.op_type == 'Add'][-1]
        relu = next(n for n in graph.node if n.op_type == 'Relu' and
                    n.input[0] == last_add.output[0])
        quantize = next(n for n in graph.node
                        if n.op_type == 'QuantizeLinear' and
                        n.input[0] == relu.output[0])
        np.testing.assert_allclose(inits[quantize.input[1]], largest / 255,
                                   rtol=1e-5)
        assert inits[quantize.input[2]].dtype == np.uint8
        assert int(inits[quantize.input[2]]) == 0
        for name in last_add.input:  # the conv side and the identity
            dq = next(n for n in graph.node if n.output[0] == name)
            assert inits[dq.input[2]].dtype == np.uint8
        zero_points = {int(inits[next(n for n in graph.node
                                      if n.output[0] == name).input[2]])
                       for name in last_add.input}
        assert zero_points == {0, 128}  # identity (post-ReLU), conv output


def test_calibrated_graph_passes_every_tensorrt_rule(classifier):
    exporter = OnnxExporter(classifier, SHAPE, tensor, 'tensorrt',
                            residual_qdq='calibrated',
                            calibration=calibration_inputs())
    for bit in (6, 2):
        found = check_tensorrt_rules(exporter.export(bit))
        assert found == {rule: [] for rule in found}, bit


def fake_quant(x, scale, signed):
    """Q -> DQ at 8 bits, zero point 0 (signed uint8 with zero point 128
    is the same integers shifted), rounding half to even as ONNX does."""
    lo, hi = (-128, 127) if signed else (0, 255)
    return torch.clamp(torch.round(x / scale), lo, hi) * scale


def residual_reference(model, inputs, calibration, bit):
    """What the calibrated graph computes, written on mmpretrain's
    BasicBlock: each block's conv side and (downsampled or first-block)
    identity rounded signed / unsigned on the way into the add, its output
    after the ReLU unsigned; scales max|x| / 127 or / 255 over
    ``calibration`` from the unrounded model."""
    blocks = [m for m in model.backbone.modules()
              if type(m).__name__ == 'BasicBlock']
    ranges, scales = {}, None

    def point(key, x, signed):
        if scales is None:
            ranges[key] = max(ranges.get(key, 0.0), float(x.abs().max()))
            return x
        return fake_quant(x, scales[key], signed)

    def forward(index, block, x):
        out = block.relu(block.norm1(block.conv1(x)))
        out = point((index, 'conv'), block.norm2(block.conv2(out)), True)
        if block.downsample is not None:
            identity = point((index, 'identity'), block.downsample(x), True)
        else:  # the first block's identity is the stem's (unsigned) output
            identity = x if index else point((index, 'identity'), x, False)
        return point((index, 'out'), block.relu(out + identity), False)

    for index, block in enumerate(blocks):
        block.forward = lambda x, i=index, b=block: forward(i, b, x)
    saved = [(a, a.scale.data.clone()) for a in readers(blocks, 0)]
    try:
        with use_bits(model, bit), torch.no_grad():
            for x in calibration:
                tensor(model, x)
            scales = {key: torch.tensor(np.float32(max(value, 1e-8) / (
                255 if key[1] == 'out' or key == (0, 'identity') else 127)))
                for key, value in ranges.items()}
            for index in range(len(blocks) - 1):
                acts = readers(blocks, index + 1)
                if bit != 8 or not acts:
                    continue  # below 8 bits the readers clip: calibrated
                # at 8 bits a block's output and the quantized layers
                # reading it share their largest trained scale
                row = acts[0].bits.index(bit)
                shared = max(a.scale.data[row] for a in acts)
                scales[(index, 'out')] = shared.float()
                for act in acts:
                    act.scale.data[row] = shared
            # the convs sum integers as the exact session does, so that
            # no conv output lands on the other side of a rounding
            with deploy_numerics(model, lambda m: tensor(m, inputs[:1])):
                return tensor(model, inputs).numpy()
    finally:
        for block in blocks:
            del block.forward
        for act, scale in saved:
            act.scale.data.copy_(scale)


def readers(blocks, index):
    """The input quantizers of the block that reads block ``index - 1``'s
    output: its conv1 and its downsample conv."""
    if index >= len(blocks):
        return []
    block = blocks[index]
    layers = [block.conv1] + ([block.downsample[0]]
                              if block.downsample is not None else [])
    return [layer.act_quantizer for layer in layers
            if getattr(layer, 'act_quantizer', None) is not None]


@pytest.mark.parametrize('bit', [8, 4])
def test_calibrated_graph_equals_its_reference(classifier, calibrated, bit):
    x = torch.randn(16, *SHAPE[1:], generator=torch.Generator().manual_seed(9))
    proto = calibrated.export(bit)
    got = make_session(proto.SerializeToString()).run(
        None, {'input': x.numpy()})[0]
    want = residual_reference(classifier, x, calibration_inputs(), bit)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with use_bits(classifier, bit), torch.no_grad():
        plain_model = tensor(classifier, x).numpy()
    assert np.abs(plain_model - want).max() > 1e-3  # the rounding shows
    # at 8 bits a block output's readers quantize it as it was quantized:
    # a DQ -> Q pair of equal scale and zero point (ONNX Runtime drops it)
    producers = {o: n for n in proto.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i)
             for i in proto.graph.initializer}
    requantized = [n.name for n in proto.graph.node
                   if n.op_type == 'QuantizeLinear' and
                   getattr(producers.get(n.input[0]), 'op_type', '') ==
                   'DequantizeLinear' and any(
                       inits[a] != inits[b] for a, b in zip(
                           n.input[1:], producers[n.input[0]].input[1:]))]
    assert (requantized == []) == (bit == 8), requantized


def test_bad_options_refused(classifier):
    model = classifier
    with pytest.raises(ValueError, match="residual_qdq must be one of "
                       "\\['none', 'calibrated'\\], got 'yes'"):
        OnnxExporter(model, SHAPE, tensor, residual_qdq='yes')
    with pytest.raises(ValueError, match="'calibrated' needs calibration"):
        OnnxExporter(model, SHAPE, tensor, residual_qdq='calibrated')
    with pytest.raises(ValueError, match="fp_layers must be one of .*"
                       "got 'int4'"):
        OnnxExporter(model, SHAPE, tensor, fp_layers='int4')
    with pytest.raises(ValueError, match="fp_layers='int8_weights'.*"
                       "TensorRT"):
        OnnxExporter(model, SHAPE, tensor, 'tensorrt',
                     fp_layers='int8_weights')
    with pytest.raises(ValueError, match="fp_layers='int8' needs "
                       "calibration"):
        OnnxExporter(model, SHAPE, tensor, fp_layers='int8')


def test_a_plain_chain_quantizes_only_its_last_conv_output(make_tiny_cnn):
    """No residual adds; the last quantized conv's output goes to a mean,
    not to one QuantizeLinear, so it is quantized for its readers (its
    conv then fuses); the others feed one Q each and get nothing."""
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    exporter = OnnxExporter(model, (1, 3, 6, 6), plain,
                            residual_qdq='calibrated',
                            calibration=[torch.randn(2, 3, 6, 6)])
    proto = exporter.export(4)
    assert residual_tensors(proto) == ({}, {})  # all done
    added = [n for n in proto.graph.node if n.name.endswith('.quantize')]
    producer = {o: n for n in proto.graph.node for o in n.output}
    assert len(added) == 1
    relu = producer[added[0].input[0]]
    conv = producer[relu.input[0]]
    assert relu.op_type == 'Relu' and conv.op_type == 'Conv'
    assert 'conv3' in producer[conv.input[1]].input[0]
    assert optimized_ops(proto).get('QLinearConv') == 3


def folded_stem(model, bit) -> torch.Tensor:
    """TinyCNN's stem weight with bn0's copy of ``bit`` folded in,
    float64."""
    bn = model.bn0.bns[str(bit)]
    factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() +
                                             bn.eps)
    return model.stem.weight.detach().double() * factor.view(-1, 1, 1, 1)


@pytest.mark.parametrize('storage', ['float16', 'int8_weights'])
def test_fp_layer_weights_stored_smaller(make_tiny_cnn, storage):
    model = make_tiny_cnn()
    quantize_model(model, bits=list(BITS))
    calibrate(model, (4, 3, 6, 6))
    proto = OnnxExporter(model, (1, 3, 6, 6), plain,
                         fp_layers=storage).export(8)
    inits = {i.name: numpy_helper.to_array(i)
             for i in proto.graph.initializer}
    want = folded_stem(model, 8).numpy()
    name = 'model.stem.weight'
    assert name not in inits and 'model.fc2.weight' not in inits
    if storage == 'float16':
        assert inits[name + '_fp16'].dtype == np.float16
        np.testing.assert_array_equal(inits[name + '_fp16'],
                                      want.astype(np.float16))
    else:
        q, scale = inits[name + '_q'], inits[name + '_scale']
        assert q.dtype == np.int8 and scale.shape == (want.shape[0], )
        reference = np.abs(want).reshape(len(want), -1).max(1) / 127
        np.testing.assert_allclose(scale, reference, rtol=1e-6)
        np.testing.assert_array_equal(
            q, np.clip(np.rint(want / scale.astype(np.float64)
                               .reshape(-1, 1, 1, 1)), -127, 127))
        assert np.abs(q).reshape(len(q), -1).max(1).tolist() == \
            [127] * len(q)
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    got = make_session(proto.SerializeToString()).run(
        None, {'input': x.numpy()})[0]
    with use_bits(model, 8), torch.no_grad():
        reference_out = model(x).numpy()
    assert not np.array_equal(got, reference_out)
    np.testing.assert_allclose(got, reference_out, atol=0.05 * np.ptp(
        reference_out))


@pytest.fixture(scope='module')
def int8_ends(classifier):
    """Calibrated residuals and the FP stem and classifier in int8."""
    return OnnxExporter(classifier, SHAPE, tensor, residual_qdq='calibrated',
                        calibration=calibration_inputs(), fp_layers='int8')


@pytest.mark.parametrize('bit', [8, 2])
def test_fp_layers_int8_run_as_integer_kernels(int8_ends, bit):
    ops = optimized_ops(int8_ends.export(bit))
    assert ops.get('QLinearConv') == 15 and ops.get('QGemm') == 1  # 14 + 1
    assert not {'Conv', 'FusedConv', 'Gemm', 'MatMul'} & set(ops), ops
    if bit == 8:  # the input and the pooled features; no requantization
        assert ops['QuantizeLinear'] == 2, ops


def test_fp_layers_int8_scales_and_biases(classifier, int8_ends):
    """The image is quantized at max|x| / 127 (uint8, zero point 128); the
    stem's output at 8 bits takes its quantized readers' scale (they read
    it at the whole container), at 2 bits max|x| / 255 of its ReLU; the
    classifier's input at max|x| / 255 and its bias int32 at input scale x
    weight scale, float64 reference."""
    from mmdrq.quantization.integers import scale_at
    model, inputs = classifier, calibration_inputs()
    backbone, head = model.backbone, model.head.fc
    for bit in (8, 2):
        proto = int8_ends.export(bit)
        inits = {i.name: numpy_helper.to_array(i)
                 for i in proto.graph.initializer}
        producer = {o: n for n in proto.graph.node for o in n.output}
        conv = next(n for n in proto.graph.node if n.op_type == 'Conv')
        gemm = next(n for n in proto.graph.node if n.op_type == 'Gemm')

        def quantizer_of(name):  # the Q behind a DequantizeLinear's output
            return producer[producer[name].input[0]]
        image_q = quantizer_of(conv.input[0])
        largest = max(float(x.abs().max()) for x in inputs)
        np.testing.assert_allclose(inits[image_q.input[1]], largest / 127,
                                   rtol=1e-6)
        assert inits[image_q.input[2]].dtype == np.uint8
        assert int(inits[image_q.input[2]]) == 128
        relu = next(n for n in proto.graph.node if n.op_type == 'Relu')
        assert relu.input[0] == conv.output[0]
        stem_q = next(n for n in proto.graph.node
                      if n.op_type == 'QuantizeLinear' and
                      n.input[0] == relu.output[0])
        # measured on the graph: its stem has the int8 weights, its
        # quantized convs sum integers
        trained = backbone.conv1.weight.data.clone()
        bn = backbone.bn1.bns[str(bit)]
        factor = (bn.weight.double() / torch.sqrt(bn.running_var.double() +
                                                  bn.eps)).view(-1, 1, 1, 1)
        folded = trained.double() * factor
        step = (folded.abs().flatten(1).amax(1) / 127).float().double()
        integers = torch.round(folded / step.view(-1, 1, 1, 1))
        backbone.conv1.weight.data = (integers * step.view(-1, 1, 1, 1) /
                                      factor).float()
        try:
            with use_bits(model, bit), torch.no_grad():
                stem_out = max(float(backbone.relu(backbone.bn1(
                    backbone.conv1(x))).max()) for x in inputs)
                with deploy_numerics(model, lambda m: tensor(m, inputs[0])):
                    pooled = max(float(model.neck(backbone(x))[-1].abs()
                                       .max()) for x in inputs)
        finally:
            backbone.conv1.weight.data = trained
        want = float(scale_at(backbone.layer1[0].conv1.act_quantizer, 8)) \
            if bit == 8 else stem_out / 255
        np.testing.assert_allclose(inits[stem_q.input[1]], want, rtol=1e-5)
        x_scale = inits[quantizer_of(gemm.input[0]).input[1]]
        np.testing.assert_allclose(x_scale, pooled / 255, rtol=1e-5)
        weight = head.weight.detach().double()
        w_scale = (weight.abs().amax(1) / 127).float().double().numpy()
        step = (np.float64(x_scale) * w_scale).astype(np.float32)
        bias_dq = producer[gemm.input[2]]
        np.testing.assert_array_equal(inits[bias_dq.input[1]], step)
        np.testing.assert_array_equal(
            inits[bias_dq.input[0]],
            np.round(head.bias.detach().double().numpy() /
                     step.astype(np.float64)))


def test_fp_layers_int8_outputs_near_pytorch(classifier, int8_ends):
    x = torch.randn(8, *SHAPE[1:], generator=torch.Generator().manual_seed(3))
    for bit in (8, 4):
        got = make_session(int8_ends.export(bit).SerializeToString(), 1,
                           'integer').run(None, {'input': x.numpy()})[0]
        with use_bits(classifier, bit), torch.no_grad():
            want = tensor(classifier, x).numpy()
        assert not np.array_equal(got, want)
        np.testing.assert_allclose(got, want, atol=0.05 * np.ptp(want))


def test_fp_layers_int8_pass_every_tensorrt_rule(classifier):
    exporter = OnnxExporter(classifier, SHAPE, tensor, 'tensorrt',
                            residual_qdq='calibrated',
                            calibration=calibration_inputs(),
                            fp_layers='int8')
    found = check_tensorrt_rules(exporter.export(4))
    assert found == {rule: [] for rule in found}


def test_a_detector_runs_every_conv_call_as_an_integer_kernel(tmp_path):
    """RetinaNet-R18 (random weights): its FPN levels feed both head
    branches, its top lateral is also upsampled, its FP prediction convs
    (5 calls each) end in graph outputs: with calibrated residuals and
    --fp-layers int8, every conv call is an integer kernel."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    path = tmp_path / 'retinanet.py'
    path.write_text("_base_ = 'mmdet::retinanet/retinanet_r18_fpn_1x_coco.py'"
                    "\nmodel = dict(backbone=dict(init_cfg=None))\n")
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(str(path)).model).eval()
    quantize_model(model, bits=[8, 4])
    model.train()
    with torch.no_grad():
        for bit in (8, 4):
            with use_bits(model, bit):
                model(torch.randn(2, 3, 96, 96), mode='tensor')
    model.eval()
    calibration = [torch.randn(2, 3, 96, 96,
                               generator=torch.Generator().manual_seed(1))]
    exporter = OnnxExporter(model, (1, 3, 96, 96), tensor,
                            residual_qdq='calibrated',
                            calibration=calibration, fp_layers='int8')
    calls = 20 + 3 + 5 + 5 * (4 + 4 + 2)  # backbone, laterals, FPN, head
    ops = optimized_ops(exporter.export(8))
    assert ops.get('QLinearConv') == calls, ops
    assert not {'Conv', 'FusedConv'} & set(ops), ops
