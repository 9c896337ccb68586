"""Switchable GroupNorm / LayerNorm: one copy per bit, conversion option,
transitional pairs, checkpoints and integer export."""
import copy
import os.path as osp

import pytest
import torch
from torch import nn

import mmdrq
from mmdrq import load_int, quantize_model, save_int, set_bits, use_bits
from mmdrq.quantization import to_transitional
from mmdrq.quantization.switchable_bn import SwitchableNorm

BITS = [8, 4, 2]


class GNLNNet(nn.Module):
    """stem -> conv -> GN -> relu -> pool -> fc1 -> LN -> fc2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.fc1 = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv(torch.relu(self.stem(x)))))
        return self.fc2(self.ln(self.fc1(x.mean((2, 3)))))


def reference_group_norm(x, groups, weight, bias, eps):
    """GN written out in float64: per sample and group, biased variance."""
    x = x.double()
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = ((g - mean)**2).mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1, ) * (x.dim() - 2)
    return y * weight.double().view(shape) + bias.double().view(shape)


def reference_layer_norm(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean)**2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + \
        bias.double()


def converted(**kwargs):
    torch.manual_seed(0)
    model = quantize_model(GNLNNet(), bits=BITS, **kwargs)
    # distinct affine parameters per bit
    for norm in (model.gn, model.ln):
        for bit in BITS:
            copy_ = norm.bns[str(bit)]
            copy_.weight.data = torch.randn_like(copy_.weight) + bit
            copy_.bias.data = torch.randn_like(copy_.bias) - bit
    return model


def test_conversion_and_sources():
    model = converted()
    assert isinstance(model.gn, SwitchableNorm) and \
        isinstance(model.ln, SwitchableNorm)
    assert list(model.gn.bns) == ['8', '4', '2']
    assert isinstance(model.gn.bns['4'], nn.GroupNorm)
    assert model.gn.source == 'conv' and model.ln.source == 'fc1'
    assert model.gn.num_features == 8 and model.ln.num_features == 6
    rows = {r.layer: r.status for r in model.mmdrq_report}
    assert rows['gn'] == 'switchable norm (follows conv)'
    # off: GN and LN stay as they are, BN conversion is its own option
    torch.manual_seed(0)
    plain = quantize_model(GNLNNet(), bits=BITS, switchable_gn_ln=False)
    assert type(plain.gn) is nn.GroupNorm and type(plain.ln) is nn.LayerNorm
    torch.manual_seed(0)
    only = quantize_model(GNLNNet(), bits=BITS, switchable_bn=False)
    assert isinstance(only.gn, SwitchableNorm)
    # a skip pattern keeps a norm FP and counts as used
    torch.manual_seed(0)
    skipped = quantize_model(GNLNNet(), bits=BITS, skip=['ln'])
    assert type(skipped.ln) is nn.LayerNorm


@pytest.mark.parametrize('value', ['yes', 1, None])
def test_option_is_type_checked(value):
    with pytest.raises(ValueError, match='switchable_gn_ln must be True or '
                       f'False, got {value!r}'):
        quantize_model(GNLNNet(), bits=BITS, switchable_gn_ln=value)


def test_each_bit_uses_its_own_affine_parameters():
    model = converted()
    inputs = {}

    def keep(name):
        def hook(module, args, output):
            inputs[name] = (args[0].detach(), output)
        return hook

    model.gn.register_forward_hook(keep('gn'))
    model.ln.register_forward_hook(keep('ln'))
    torch.manual_seed(1)
    x = torch.randn(3, 3, 5, 5)
    outputs = {}
    for bit in BITS:
        set_bits(model, bit)
        outputs[bit] = model(x)
        gn_in, gn_out = inputs['gn']
        ref = model.gn.bns[str(bit)]
        torch.testing.assert_close(
            gn_out.double(), reference_group_norm(gn_in, 4, ref.weight,
                                                  ref.bias, ref.eps),
            rtol=1e-5, atol=1e-5)
        ln_in, ln_out = inputs['ln']
        ref = model.ln.bns[str(bit)]
        torch.testing.assert_close(
            ln_out.double(), reference_layer_norm(ln_in, ref.weight,
                                                  ref.bias, ref.eps),
            rtol=1e-5, atol=1e-5)
        # only this bit's copy gets a gradient
        model.zero_grad()
        outputs[bit].sum().backward()
        for other in BITS:
            grad = model.gn.bns[str(other)].weight.grad
            assert (grad is not None) == (other == bit), (bit, other)
    assert not torch.allclose(outputs[8], outputs[2])


def test_fp_checkpoint_gives_every_bit_the_norm():
    torch.manual_seed(0)
    fp = GNLNNet()
    fp.gn.weight.data.uniform_(0.5, 2)
    fp.ln.bias.data.uniform_(-1, 1)
    model = quantize_model(copy.deepcopy(fp), bits=BITS)
    result = model.load_state_dict(fp.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all('quantizer' in k for k in result.missing_keys)
    for bit in BITS:
        torch.testing.assert_close(model.gn.bns[str(bit)].weight,
                                   fp.gn.weight)
        torch.testing.assert_close(model.ln.bns[str(bit)].bias, fp.ln.bias)


def test_transitional_pairs_for_gn():
    model = converted()
    x = torch.randn(2, 3, 5, 5)
    rows = {r.layer: r.status
            for r in to_transitional(model, lambda m: m(x))}
    # conv's input comes from the FP stem: GN keys by its own bit
    assert 'unknown' in rows['gn'] and set(model.gn.bns) == {'8', '4', '2'}
    assert rows['ln'] == '(conv, fc1) pairs'
    assert set(model.ln.bns) == {f'{p}_{c}' for p in BITS for c in BITS}
    # a pair starts from its own bit's switchable copy
    assert isinstance(model.ln.bns['2_4'], nn.LayerNorm)
    torch.testing.assert_close(model.ln.bns['2_4'].weight,
                               model.ln.bns['8_4'].weight)
    assert not torch.equal(model.ln.bns['2_4'].weight,
                           model.ln.bns['2_2'].weight)
    mmdrq.set_layer_bits(model, {'conv': 2, 'fc1': 4})
    assert (model.ln.prev_bit, model.ln.bit) == (2, 4)


def trained():
    """A converted model with every bit's scales initialised, in eval mode,
    and its input."""
    model = converted()
    x = torch.randn(2, 3, 5, 5)
    model.train()
    for bit in BITS:
        set_bits(model, bit)
        model(x)
    return model.eval(), x


def test_checkpoint_and_integer_export_round_trip(tmp_path):
    model, x = trained()
    expected = {}
    with torch.no_grad():
        for bit in BITS:
            set_bits(model, bit)
            expected[bit] = model(x)
    # the plain state dict and the integer checkpoint
    path = str(tmp_path / 'int.pth')
    save_int(model, path)
    for load in ('state_dict', 'int'):
        torch.manual_seed(5)
        fresh = quantize_model(GNLNNet(), bits=BITS)
        if load == 'int':
            load_int(fresh, path)
        else:
            fresh.load_state_dict(model.state_dict(), strict=True)
        fresh.eval()
        with torch.no_grad():
            for bit in BITS:
                set_bits(fresh, bit)
                torch.testing.assert_close(fresh(x), expected[bit],
                                           rtol=0, atol=0)


def test_onnx_export_uses_each_bits_norm():
    """Per-bit ONNX graphs carry the bit's GN/LN affine (before the export
    knew switchable GN/LN, every bit ran the highest bit's)."""
    pytest.importorskip('onnxruntime')
    from mmdrq.deploy import OnnxExporter, make_session
    model, x = trained()
    exporter = OnnxExporter(model, (2, 3, 5, 5),
                            forward=lambda module, inputs: module(inputs))
    for bit in BITS:
        session = make_session(exporter.export(bit).SerializeToString())
        got = session.run(None, {'input': x.numpy()})[0]
        set_bits(model, bit)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4,
                                   atol=1e-4)


def test_a_norm_called_with_more_arguments_gets_them():
    """mmpretrain's LayerNorm2d takes ``data_format``; ConvNeXt calls it
    so. Its switchable copy passes every argument through: loss, backward
    and prediction at every bit."""
    import tempfile

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'convnext.py')
        with open(path, 'w') as f:
            f.write("_base_ = 'mmpretrain::convnext/convnext-tiny_32xb128_"
                    "in1k.py'\nmodel = dict(backbone=dict(arch=dict(_delete_"
                    "=True, depths=[1, 1, 1, 1], channels=[8, 16, 32, 64]))"
                    ", head=dict(in_channels=64, num_classes=4))\n")
        cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmpretrain')
    model = quantize_model(MODELS.build(cfg.model), bits=BITS,
                           switchable_gn_ln=True)
    calls = [m for m in model.modules() if isinstance(m, SwitchableNorm)]
    assert calls
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i) for i in (0, 3)]
    for bit in BITS:
        with use_bits(model, bit):
            model.train()
            loss = model(torch.randn(2, 3, 32, 32), samples, mode='loss')
            sum(loss.values()).backward()
    model.eval()
    with use_bits(model, min(BITS)), torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32), mode='tensor').shape == (2, 4)
