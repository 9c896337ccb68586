"""quantize_model on real OpenMMLab models and on small torch models."""
import math
import re

import pytest
import torch
from mmengine.structures import InstanceData, PixelData
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import (DEEPLAB_CPU_OPTIONS, DEEPLABV3_CFG, RESNET18_CFG,
                      RETINANET_CFG, MyConv, build_openmmlab_model,
                      total_loss)
from mmdrq import (QConv2d, QLinear, QuantizeConfig, SwitchableBatchNorm,
                   quantize_model, set_bits)
from mmdrq.quantization import QuantLayer

BITS = (8, 6, 4, 2)


# --------------------------------------------------------------- helpers

def _conv_hparams(model):
    """Hyper-parameters of every Conv2d / Linear, to compare after
    conversion (the quantized layer must keep them all)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = ('conv', m.in_channels, m.out_channels,
                         m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups, m.bias is None, m.padding_mode,
                         id(m.weight), None if m.bias is None else id(m.bias))
        elif isinstance(m, nn.Linear):
            out[name] = ('linear', m.in_features, m.out_features,
                         m.bias is None, id(m.weight),
                         None if m.bias is None else id(m.bias))
    return out


def _assert_split(model, fp_names):
    """Exactly ``fp_names`` stay FP; every other conv/linear is quantized;
    every BN lives inside a SwitchableBatchNorm."""
    fp_found = set()
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            assert name not in fp_names, f'{name} should stay FP'
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            assert name in fp_names, \
                f'{name} ({type(m).__name__}) was not quantized'
            assert type(m) in (nn.Conv2d, nn.Linear), name
            fp_found.add(name)
        elif isinstance(m, _BatchNorm):
            assert '.bns.' in name, f'{name} is not switchable'
    assert fp_found == set(fp_names)
    n_quant = sum(isinstance(m, (QConv2d, QLinear)) for m in model.modules())
    assert n_quant > 10
    for name, m in model.named_modules():
        if isinstance(m, SwitchableBatchNorm):
            assert list(m.bns.keys()) == [str(b) for b in BITS], name


def _quant_layers(model):
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear))]


def _flat(out):
    if torch.is_tensor(out):
        return out.reshape(-1)
    return torch.cat([_flat(o) for o in out])


def _check_training_at_every_bit(model, loss_fn, tensor_fn):
    """Forward + backward at every bit: finite losses, gradients on weights,
    weight scales and the current bit's activation scale only; outputs at
    bits 8 and 2 differ."""
    model.train()
    losses, frozen = {}, set()
    for bit in BITS:
        set_bits(model, bit)
        model.zero_grad(set_to_none=True)
        loss = total_loss(loss_fn())
        assert torch.isfinite(loss), (bit, loss)
        loss.backward()
        losses[bit] = loss.item()
        index = BITS.index(bit)
        # With random weights a few layers can see all their gradient clipped
        # by a downstream quantizer (e.g. RetinaNet's P6/P7 convs at 2 bits):
        # every trainable layer must get finite gradients, nearly all nonzero.
        zero, trainable = set(), 0
        for name, m in _quant_layers(model):
            assert m.bit == bit
            if not m.weight.requires_grad:
                # frozen stages (mmdet's frozen_stages=1): the whole layer,
                # quantizer scales included, stays frozen
                for p in m.parameters():
                    assert not p.requires_grad and p.grad is None, name
                frozen.add(name)
                continue
            trainable += 1
            act = m.act_quantizer.scale.grad
            for what, grad in (('weight', m.weight.grad),
                               ('weight scale', m.weight_quantizer.scale.grad),
                               ('act scale', act)):
                assert grad is not None, f'{name}: no {what} grad at {bit}'
                assert torch.isfinite(grad).all(), (name, what, bit)
            if m.weight.grad.abs().sum() == 0 or act[index] == 0 or \
                    m.weight_quantizer.scale.grad.abs().sum() == 0:
                zero.add(name)
            others = [i for i in range(len(BITS)) if i != index]
            assert torch.all(act[others] == 0), \
                f'{name}: act scales of other bits got grad at {bit}'
        assert trainable > 10
        assert len(zero) <= 0.1 * trainable, (bit, sorted(zero))
    assert losses[8] != losses[2]
    model.eval()
    with torch.no_grad():
        set_bits(model, 8)
        out8 = _flat(tensor_fn())
        set_bits(model, 2)
        out2 = _flat(tensor_fn())
    assert torch.isfinite(out8).all() and torch.isfinite(out2).all()
    assert not torch.allclose(out8, out2)
    return frozen


def _check_hparams_kept(before, model):
    after = _conv_hparams(model)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], name


# ------------------------------------------------------ OpenMMLab models

def test_mmpretrain_resnet18():
    from mmpretrain.structures import DataSample
    model = build_openmmlab_model('mmpretrain', RESNET18_CFG)
    before = _conv_hparams(model)
    assert quantize_model(model) is model
    _check_hparams_kept(before, model)
    _assert_split(model, {'backbone.conv1', 'head.fc'})
    # mmpretrain's norm1/norm2 properties resolve to the switchable BNs
    block = model.backbone.layer1[0]
    assert isinstance(block.norm1, SwitchableBatchNorm)
    assert block.norm1.source == 'backbone.layer1.0.conv1'

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    samples = [DataSample().set_gt_label(torch.tensor([1])),
               DataSample().set_gt_label(torch.tensor([7]))]
    _check_training_at_every_bit(
        model, lambda: model(x, samples, mode='loss'),
        lambda: model(x, mode='tensor'))


def test_mmdet_retinanet():
    from mmcv.cnn import ConvModule
    from mmdet.structures import DetDataSample
    model = build_openmmlab_model('mmdet', RETINANET_CFG)
    before = _conv_hparams(model)
    quantize_model(model)
    _check_hparams_kept(before, model)
    _assert_split(model, {'backbone.conv1', 'bbox_head.retina_cls',
                          'bbox_head.retina_reg'})
    for cm in (model.neck.lateral_convs[0], model.neck.fpn_convs[4],
               model.bbox_head.cls_convs[0], model.bbox_head.reg_convs[3]):
        assert isinstance(cm, ConvModule)
        assert isinstance(cm.conv, QConv2d)

    torch.manual_seed(0)
    size = 128
    x = torch.randn(1, 3, size, size)
    sample = DetDataSample(metainfo=dict(
        img_shape=(size, size), pad_shape=(size, size),
        ori_shape=(size, size), scale_factor=(1.0, 1.0),
        batch_input_shape=(size, size)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[10., 20., 90., 100.], [30., 30., 60., 70.]]),
        labels=torch.tensor([1, 5]))
    frozen = _check_training_at_every_bit(
        model, lambda: model(x, [sample], mode='loss'),
        lambda: model(x, mode='tensor'))
    assert frozen == {n for n, _ in _quant_layers(model)
                      if n.startswith('backbone.layer1.')}

    # ConvModule (conv -> act, no norm) still runs our QConv2d
    cm = model.bbox_head.cls_convs[0]
    feat = torch.randn(1, cm.conv.in_channels, 6, 6)
    with torch.no_grad():
        for bit in (8, 2):
            set_bits(model, bit)
            assert torch.equal(cm(feat), cm.activate(cm.conv(feat)))
        set_bits(model, 8)
        out8 = cm(feat)
        set_bits(model, 2)
        assert not torch.allclose(out8, cm(feat))


def test_mmseg_deeplabv3():
    from mmcv.cnn import ConvModule
    from mmseg.structures import SegDataSample
    model = build_openmmlab_model('mmseg', DEEPLABV3_CFG, DEEPLAB_CPU_OPTIONS)
    before = _conv_hparams(model)
    quantize_model(model)
    _check_hparams_kept(before, model)
    _assert_split(model, {'backbone.stem.0', 'decode_head.conv_seg',
                          'auxiliary_head.conv_seg'})
    aspp = model.decode_head.aspp_modules[1]
    assert isinstance(aspp.conv, QConv2d) and aspp.conv.dilation == (12, 12)

    torch.manual_seed(0)
    size = 32
    # batch 2: the ASPP image pool has 1x1 maps, BN needs > 1 value
    x = torch.randn(2, 3, size, size)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), pad_shape=(size, size),
            ori_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, 150, (1, size, size)))
        samples.append(sample)
    _check_training_at_every_bit(
        model, lambda: model(x, samples, mode='loss'),
        lambda: model(x, mode='tensor'))

    # ConvModule conv -> norm -> act with a switchable norm
    cm = model.decode_head.bottleneck
    assert isinstance(cm, ConvModule) and cm.with_norm
    assert isinstance(cm.conv, QConv2d)
    assert isinstance(cm.norm, SwitchableBatchNorm)
    assert cm.norm.source == 'decode_head.bottleneck.conv'
    feat = torch.randn(2, cm.conv.in_channels, 3, 3)
    with torch.no_grad():
        for bit in (8, 2):
            set_bits(model, bit)
            ref = cm.activate(cm.norm.bns[str(bit)](cm.conv(feat)))
            assert torch.equal(cm(feat), ref)


# ----------------------------------------------------- skips and errors

@pytest.fixture
def resnet18():
    return build_openmmlab_model('mmpretrain', RESNET18_CFG)


def _status(model):
    return {r.layer: r.status for r in model.mmdrq_report}


def test_skip_patterns_fullmatch(resnet18):
    layer4_pattern = r'backbone\.layer4\.\d+\.conv\d'
    model = quantize_model(
        resnet18, skip=[layer4_pattern, r'backbone\.layer1\.0\.bn1'])
    status = _status(model)
    layer4 = [f'backbone.layer4.{i}.conv{j}' for i in (0, 1) for j in (1, 2)]
    for name in layer4:
        module = model.get_submodule(name)
        assert type(module) is nn.Conv2d, name
        assert status[name] == \
            f'FP: matches skip pattern {layer4_pattern!r}'
    # fullmatch: the downsample conv of layer4 is not named by the pattern
    assert isinstance(model.backbone.layer4[0].downsample[0], QConv2d)
    # a skipped BN stays one plain BN
    assert type(model.backbone.layer1[0].bn1) is nn.BatchNorm2d
    assert status['backbone.layer1.0.bn1'].startswith('FP')
    assert isinstance(model.backbone.layer1[0].bn2, SwitchableBatchNorm)
    # the default first/last skip still applies
    assert type(model.backbone.conv1) is nn.Conv2d
    assert type(model.head.fc) is nn.Linear


@pytest.mark.parametrize('pattern', [
    'backbone.layer1.0.conv',       # a prefix: fullmatch, not match
    'layer1.0.conv1',               # a suffix: fullmatch, not search
    'backbone.layer9.*',
])
def test_skip_pattern_matching_nothing(resnet18, pattern):
    with pytest.raises(ValueError) as info:
        quantize_model(resnet18, skip=['backbone.conv1', pattern])
    message = str(info.value)
    assert pattern in message
    assert "'backbone.conv1'" not in message.split('such as')[0]
    # nothing was converted
    assert not any(isinstance(m, (QConv2d, QLinear, SwitchableBatchNorm))
                   for m in resnet18.modules())
    assert getattr(resnet18, 'mmdrq_config', None) is None


def test_skip_first_last_off(resnet18):
    quantize_model(resnet18, skip_first_last=False)
    assert isinstance(resnet18.backbone.conv1, QConv2d)
    assert isinstance(resnet18.head.fc, QLinear)
    assert not any(type(m) in (nn.Conv2d, nn.Linear)
                   for m in resnet18.modules())


@pytest.mark.parametrize('key, suggestion', [
    ('bit', 'bits'),
    ('skip_frist_last', 'skip_first_last'),
    ('skips', 'skip'),
    ('act_quantiser', 'act_quantizer'),
])
def test_unknown_config_key(make_tiny_cnn, key, suggestion):
    model = make_tiny_cnn()
    for call in (lambda: quantize_model(model, **{key: [8, 4]}),
                 lambda: quantize_model(model, {key: [8, 4]}),
                 lambda: QuantizeConfig.from_dict({key: [8, 4]})):
        with pytest.raises(KeyError) as info:
            call()
        message = info.value.args[0]
        assert repr(key) in message
        assert f'did you mean {suggestion!r}' in message
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in model.modules())


@pytest.mark.parametrize('bits, expected', [
    ([], r'empty'),
    ((), r'empty'),
    ([8, 8, 4], r'duplicate.*\[8, 8, 4\]'),
    ([4, 8], r'sorted.*\[4, 8\]'),
    ([8, 4, 1], r'\b1\b'),
    ([17, 8], r'\b17\b'),
    ([8, 4.0], r'4\.0'),
])
def test_bad_bit_lists(make_tiny_cnn, bits, expected):
    model = make_tiny_cnn()
    with pytest.raises(ValueError, match=expected):
        quantize_model(model, bits=bits)
    with pytest.raises(ValueError, match=expected):
        QuantizeConfig(bits=bits)
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in model.modules())


@pytest.mark.parametrize('bits', [[16, 2], [8], [4, 3, 2], [2]])
def test_good_bit_lists(make_tiny_cnn, bits):
    model = quantize_model(make_tiny_cnn(), bits=bits)
    assert model.conv1.bits == tuple(bits) and model.conv1.bit == bits[0]
    model.train()
    for bit in bits:
        set_bits(model, bit)
        assert torch.isfinite(model(torch.randn(2, 3, 6, 6))).all()


def test_conversion_table_logged(resnet18, mmengine_caplog):
    model = quantize_model(resnet18, skip=[r'backbone\.layer2\.0\.conv1'])
    rows = model.mmdrq_report
    names = [row.layer for row in rows]
    # one row per conv/linear and per BN of the original model
    assert len(names) == len(set(names))
    expected = {n for n, m in model.named_modules()
                if isinstance(m, (nn.Conv2d, nn.Linear, SwitchableBatchNorm))}
    assert set(names) == expected
    status = _status(model)
    assert status['backbone.conv1'].startswith('FP') and \
        'first' in status['backbone.conv1']
    assert status['head.fc'].startswith('FP') and \
        'prediction' in status['head.fc']
    assert status['backbone.layer2.0.conv1'].startswith('FP') and \
        'skip' in status['backbone.layer2.0.conv1']
    assert status['backbone.layer2.0.conv2'] == 'quantized [8, 6, 4, 2]'
    assert 'switchable' in status['backbone.layer1.0.bn1']
    # typed: the decision and whether skip_first_last made it
    by_name = {row.layer: row for row in rows}
    assert [(by_name[n].decision, by_name[n].by_default) for n in (
        'backbone.conv1', 'head.fc', 'backbone.layer2.0.conv1',
        'backbone.layer2.0.conv2', 'backbone.layer1.0.bn1')] == [
        ('fp', True), ('fp', True), ('fp', False), ('quantized', False),
        ('switchable BN', False)]

    text = '\n'.join(r.getMessage() for r in mmengine_caplog.records)
    assert 'mmdrq conversion of ImageClassifier' in text
    for row in rows:
        line = next(line for line in text.splitlines()
                    if line.split('|')[0].strip() == row.layer)
        assert row.status in line


def test_custom_conv_subclass_stays_fp(mmengine_caplog):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        MyConv(6, 6, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(6, 6, 2, stride=2), nn.ReLU(),
        nn.Conv2d(6, 5, 1))
    quantize_model(model)
    status = _status(model)
    assert type(model[6]) is MyConv
    assert status['6'] == 'FP: unsupported type MyConv'
    # a transposed conv is quantized in place (weight_layers.py)
    assert isinstance(model[8], nn.ConvTranspose2d) and \
        isinstance(model[8], QuantLayer)
    assert status['8'] == 'quantized [8, 6, 4, 2]'
    assert isinstance(model[3], QConv2d)
    assert status['3'] == 'quantized [8, 6, 4, 2]'
    assert type(model[0]) is nn.Conv2d   # first layer
    assert type(model[10]) is nn.Conv2d  # last layer
    text = '\n'.join(r.getMessage() for r in mmengine_caplog.records)
    assert 'unsupported type MyConv' in text
    model.train()
    for bit in BITS:
        set_bits(model, bit)
        out = model(torch.randn(2, 3, 5, 5))
        assert out.shape == (2, 5, 10, 10) and torch.isfinite(out).all()


def test_custom_conv_subclass_is_still_called():
    """The unsupported layer keeps its own forward (not replaced)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                          MyConv(4, 4, 1), nn.Conv2d(4, 2, 1))
    quantize_model(model)
    x = torch.randn(1, 4, 2, 2)
    conv = model[3]
    with torch.no_grad():
        expected = nn.functional.conv2d(x, conv.weight, conv.bias) * 0.5
        assert torch.equal(conv(x), expected)


def test_converting_twice_raises(make_tiny_cnn):
    model = quantize_model(make_tiny_cnn())
    layers_before = dict(model.named_modules())
    with pytest.raises(ValueError, match='already quantized'):
        quantize_model(model)
    with pytest.raises(ValueError, match='already quantized'):
        quantize_model(model, bits=[4, 3, 2])
    assert dict(model.named_modules()) == layers_before


def test_converting_a_model_with_a_converted_part_raises(make_tiny_cnn):
    """A converted submodule (its BNs already per bit, its own bit list) is
    refused, not nested: the forward would look up bns['8'] in a BN."""
    model = nn.Sequential(make_tiny_cnn(), nn.Linear(4, 3), nn.Linear(3, 2))
    quantize_model(model[0], bits=[4, 2])
    layers_before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"submodule '0' \(TinyCNN\) has "
                       r'bits=\[4, 2\]'):
        quantize_model(model, bits=[8, 6, 4, 2])
    assert dict(model.named_modules()) == layers_before
    # a single converted layer inside a plain model too
    plain = make_tiny_cnn()
    plain.conv2 = QConv2d.from_float(plain.conv2, [8, 4])
    with pytest.raises(ValueError, match=r"submodule 'conv2' \(QConv2d\)"):
        quantize_model(plain)


@pytest.mark.parametrize('case', ['first_last', 'skipped', 'no_layers'])
def test_nothing_to_quantize_raises(case):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4, 2))
    kwargs = {}
    if case == 'skipped':
        model.insert(2, nn.Conv2d(4, 4, 1))
        kwargs = dict(skip=['2'])
    elif case == 'no_layers':
        model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match='nothing to quantize') as info:
        quantize_model(model, **kwargs)
    message = str(info.value)
    if case == 'no_layers':
        assert 'no conv or linear layer' in message
    else:
        assert "0 (first layer (skip_first_last))" in message
        assert 'prediction layer' in message
    if case == 'skipped':
        assert "2 (matches skip pattern '2')" in message
    assert getattr(model, 'mmdrq_config', None) is None


@pytest.mark.parametrize('key,value,expected', [
    ('switchable_bn', 'yes', "switchable_bn must be True or False, got 'yes'"),
    ('skip_first_last', 1, 'skip_first_last must be True or False, got 1'),
    ('skip', None, 'skip must be a list of regular expressions, got None'),
    ('skip', [3], 'skip must hold regular expressions (strings), got 3'),
    ('skip', ['['], "skip pattern '[' is not a valid regular expression"),
])
def test_config_options_are_type_checked(make_tiny_cnn, key, value,
                                         expected):
    with pytest.raises(ValueError) as info:
        quantize_model(make_tiny_cnn(), **{key: value})
    assert expected in str(info.value)


def test_tiny_cnn_default_split(make_tiny_cnn):
    model = quantize_model(make_tiny_cnn())
    assert type(model.stem) is nn.Conv2d and type(model.fc2) is nn.Linear
    for name in ('conv1', 'conv2', 'conv3'):
        assert isinstance(getattr(model, name), QConv2d)
    assert isinstance(model.fc1, QLinear)
    assert model.conv3.groups == 2
    assert model.bn1.source == 'conv1' and model.bn0.source is None
    assert isinstance(model.mmdrq_config, QuantizeConfig)
    assert model.mmdrq_config.bits == BITS


def test_parameters_are_shared_not_copied(make_tiny_cnn):
    model = make_tiny_cnn()
    ids = {n: id(p) for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantize_model(model)
    params = dict(model.named_parameters())
    for name, pid in ids.items():
        if '.bn' in '.' + name:
            continue  # BN parameters move into the per-bit copies
        assert id(params[name]) == pid, name
    # an optimizer built before the conversion still trains the layers
    model.train()
    before = model.conv1.weight.detach().clone()
    loss = model(torch.randn(2, 3, 6, 6)).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.conv1.weight)
    assert math.isfinite(loss.item())


def test_quantizers_build_in_foreign_scope(make_tiny_cnn):
    """type='ActQuantizer' resolves whatever the default scope is."""
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    model = quantize_model(make_tiny_cnn(), act_quantizer=dict(
        type='ActQuantizer', signed=True))
    assert type(model.conv1.act_quantizer).__name__ == 'ActQuantizer'
    assert int(model.conv1.act_quantizer.signed) == 1
    assert re.search(r'bits=\[8, 6, 4, 2\]',
                     model.conv1.weight_quantizer.extra_repr())


def test_eval_mode_frozen_weights_trainable_scales(make_tiny_cnn):
    """Scale-only tuning in eval mode (weights frozen, BN stats fixed): each
    backward must see a fresh graph, and give the same gradients."""
    model = quantize_model(make_tiny_cnn())
    x = torch.randn(2, 3, 6, 6)
    model.train()
    model(x)  # initialise the scales
    for name, p in model.named_parameters():
        if not name.endswith('scale'):
            p.requires_grad_(False)
    model.eval()
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        grads.append(model.conv2.weight_quantizer.scale.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize('model,config,message', [
    ('resnet', None, "takes a torch.nn.Module .* got str 'resnet'"),
    (None, [8, 4], r'got list \[8, 4\] \(the bit list goes as bits=\[...\]\)'),
    (None, 'bits=8', "must be a QuantizeConfig or a dict, got str 'bits=8'"),
])
def test_wrong_arguments_are_named(model, config, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)) \
        if model is None else model
    with pytest.raises(TypeError, match=message):
        quantize_model(model, config)
