"""Per-FPN-level norms (AQD's multi-level BN) and activation scales in
shared detection heads."""
import copy
import zlib

import numpy as np
import pytest
import torch

import mmdrq
from conftest import (RETINANET_CFG, TINY_RETINA, build_openmmlab_model,
                      det_batch)
from mmdrq.models import MultiPrecisionQAT
from mmdrq.quantization import ActQuantizer, QConv2d, quantizers_ready
from mmdrq.quantization.per_level import PerLevel, restart_levels_each_forward
from mmdrq.quantization.switchable_bn import SwitchableBatchNorm

BITS = [8, 4, 2]


def retinanet(norm=None):
    options = dict(TINY_RETINA)
    if norm is not None:
        options['model.bbox_head.norm_cfg'] = norm
    torch.manual_seed(0)
    return build_openmmlab_model('mmdet', RETINANET_CFG, options)


def level_inputs(model, x):
    """Inputs and outputs of every level copy of the head's first cls norm,
    in call order."""
    norm = model.architecture.bbox_head.cls_convs[0].norm
    seen = []
    hooks = [copy_.register_forward_hook(
        lambda m, a, out, level=level: seen.append(
            (level, a[0], out.clone())))  # before the in-place ReLU
        for level, copy_ in enumerate(norm.levels)]
    model(x, mode='tensor')
    for hook in hooks:
        hook.remove()
    return norm, seen


def test_each_level_has_its_own_bn_statistics_and_affine():
    model = MultiPrecisionQAT(retinanet(dict(type='BN')), dict(bits=BITS),
                              multi_level_norm=True)
    head = model.architecture.bbox_head
    norms = [m for m in head.modules() if isinstance(m, PerLevel)]
    assert len(norms) == 2  # one per stacked conv of each branch
    norm = head.cls_convs[0].norm
    assert len(norm.levels) == 5
    assert isinstance(norm.levels[3], SwitchableBatchNorm)
    for level, copy_ in enumerate(norm.levels):
        for bit in BITS:
            copy_.bns[str(bit)].weight.data.fill_(1 + level + bit / 10)
            copy_.bns[str(bit)].bias.data.fill_(-level)
    model.train()
    x = torch.randn(2, 3, 128, 128)
    for bit in (8, 2):
        mmdrq.set_bits(model.architecture, bit)
        before = [c.bns[str(bit)].running_mean.clone() for c in norm.levels]
        norm, seen = level_inputs(model, x)
        # level n at the n-th call: the FPN levels, finest first
        assert [level for level, _, _ in seen] == [0, 1, 2, 3, 4]
        sizes = [inp.shape[-1] for _, inp, _ in seen]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5
        for level, inp, out in seen:
            # train-mode BN of this level's input alone, this level's affine
            v = inp.double()
            mean = v.mean((0, 2, 3), keepdim=True)
            var = v.var((0, 2, 3), unbiased=False, keepdim=True)
            expected = (v - mean) / torch.sqrt(var + 1e-5) * \
                (1 + level + bit / 10) - level
            torch.testing.assert_close(out.double(), expected, rtol=1e-4,
                                       atol=1e-4)
            bn = norm.levels[level].bns[str(bit)]
            torch.testing.assert_close(
                bn.running_mean, 0.9 * before[level] + 0.1 * mean.flatten()
                .float())
    # the count wraps (mode='tensor' calls head.forward: no pre-hook) and
    # restarts at every call of the head
    assert all(n.calls % 5 == 0 for n in norms)
    feats = model.architecture.extract_feat(x)
    for n in norms:
        n.calls = 3
    head(feats)
    assert all(n.calls == 5 for n in norms)


def test_plain_checkpoint_gives_every_level_the_norm_and_trains():
    plain = MultiPrecisionQAT(retinanet(dict(type='GN', num_groups=4)),
                              dict(bits=BITS))
    leveled = MultiPrecisionQAT(retinanet(dict(type='GN', num_groups=4)),
                                dict(bits=BITS), multi_level_norm=True)
    gn = plain.architecture.bbox_head.reg_convs[0].norm
    gn.bns['4'].weight.data.uniform_(0.5, 2)
    leveled.load_state_dict(plain.state_dict(), strict=True)
    for copy_ in leveled.architecture.bbox_head.reg_convs[0].norm.levels:
        torch.testing.assert_close(copy_.bns['4'].weight, gn.bns['4'].weight)
    # a bare FP model's checkpoint: its one GN goes to every (level, bit)
    fp = retinanet(dict(type='GN', num_groups=4))
    fp.bbox_head.cls_convs[0].gn.bias.data.uniform_(-1, 1)
    result = leveled.load_state_dict(fp.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert all('quantizer' in k or k.endswith('_extra_state')
               for k in result.missing_keys), result.missing_keys
    for copy_ in leveled.architecture.bbox_head.cls_convs[0].norm.levels:
        for bit in BITS:
            torch.testing.assert_close(copy_.bns[str(bit)].bias,
                                       fp.bbox_head.cls_convs[0].gn.bias)
    # and a state dict of its own loads back strictly
    leveled.load_state_dict(leveled.state_dict(), strict=True)
    wrapper = mmdrq_optim(leveled)
    log_vars = leveled.train_step(det_batch(), wrapper)
    assert all(torch.isfinite(v) for v in log_vars.values())


def mmdrq_optim(model):
    from mmengine.optim import OptimWrapper
    return OptimWrapper(torch.optim.SGD(model.parameters(), 0.01))


@pytest.mark.parametrize('build, value, message', [
    (lambda: retinanet(), True, 'RetinaHead of RetinaNet has no norm '
     'layers'),
    (lambda: retinanet(dict(type='BN')), 'yes',
     "multi_level_norm must be True or False, got 'yes'"),
])
def test_bad_uses_are_errors(build, value, message):
    with pytest.raises(ValueError, match=message):
        MultiPrecisionQAT(build(), dict(bits=BITS), multi_level_norm=value)


# --- activation scales per level (multi_level_act_scales) ---

F64 = torch.float64


class _SharedConvHead(torch.nn.Module):
    """One conv run over every level, as a dense head's convs are."""

    def __init__(self, levels=3):
        super().__init__()
        self.conv = QConv2d.from_float(torch.nn.Conv2d(3, 4, 3, padding=1),
                                       BITS)
        self.conv.act_quantizer = PerLevel(self.conv.act_quantizer, levels)
        restart_levels_each_forward(self, [self.conv.act_quantizer])

    def forward(self, feats):
        return [self.conv(x) for x in feats]


def _set_level_scales(head, gen, signed=True):
    """Each level's scales set (no lazy init), distinct per level; returns
    them as ``{level: {bit: scale}}``."""
    scales = {}
    for level, quantizer in enumerate(head.conv.act_quantizer.levels):
        values = (torch.rand(len(BITS), generator=gen, dtype=F64) + 0.5) * \
            torch.tensor([2.0**-6, 2.0**-2, 1.0]) * (level + 1)
        with torch.no_grad():
            quantizer.scale.copy_(values)
            quantizer.initialized.fill_(True)
            quantizer.signed.fill_(int(signed))
        quantizer._read_ready()
        scales[level] = dict(zip(BITS, values.tolist()))
    return scales


def _ref_fake_quant(x, s, bit):
    """clip(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1) * s, float64."""
    q = np.clip(np.rint(x.numpy() / s), -2**(bit - 1), 2**(bit - 1) - 1)
    return torch.from_numpy(q * s)


@pytest.mark.parametrize('bit', BITS)
def test_each_level_quantizes_its_input_at_its_own_scale_ties_included(bit):
    gen = torch.Generator().manual_seed(zlib.crc32(b'levels%d' % bit))
    head = _SharedConvHead().double().eval()
    scales = _set_level_scales(head, gen)
    mmdrq.set_bits(head, bit)
    feats = []
    for level in range(3):
        s = scales[level][bit]
        # half the values exact ties (k + 1/2) * s, inside and beyond range
        k = torch.randint(-2**bit, 2**bit, (2, 3, 6, 6), generator=gen)
        x = (k + 0.5) * s
        mask = torch.rand(x.shape, generator=gen) < 0.5
        x = torch.where(mask, x, torch.randn(x.shape, generator=gen,
                                             dtype=F64) * s * 2**bit)
        feats.append(x)
    weight = head.conv.quantized_weight().detach()
    for _ in range(2):  # the count restarts at every head forward
        outs = head(feats)
        for level, (x, out) in enumerate(zip(feats, outs)):
            expected = torch.nn.functional.conv2d(
                _ref_fake_quant(x, scales[level][bit], bit), weight,
                head.conv.bias, padding=1)
            torch.testing.assert_close(out, expected)


def test_backward_recomputes_each_level_at_its_own_scale():
    """The layer saves its quantized input as a recipe; the backward must
    redo it with the level that made it, not the level count's next copy:
    gradients equal those of one layer per level run alone."""
    gen = torch.Generator().manual_seed(7)
    head = _SharedConvHead()
    _set_level_scales(head, gen)
    head.float().train()
    mmdrq.set_bits(head, 2)
    feats = [torch.randn(2, 3, 8, 8, generator=gen) * (level + 1)
             for level in range(3)]
    grads = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3)]
    sum(
        (out * g).sum() for out, g in zip(head(feats), grads)).backward()
    conv = head.conv
    expected = {name: torch.zeros_like(p)
                for name, p in conv.named_parameters()
                if 'act_quantizer' not in name}
    for level, (x, g) in enumerate(zip(feats, grads)):
        alone = copy.deepcopy(conv)
        alone.zero_grad()
        alone.act_quantizer = copy.deepcopy(conv.act_quantizer.levels[level])
        (alone(x) * g).sum().backward()
        for name in expected:
            expected[name] += alone.get_parameter(name).grad
        torch.testing.assert_close(conv.act_quantizer.levels[level].scale.grad,
                                   alone.act_quantizer.scale.grad)
    for name, grad in expected.items():
        torch.testing.assert_close(conv.get_parameter(name).grad, grad,
                                   msg=name)


def test_head_act_scales_start_from_their_own_level_and_load():
    model = MultiPrecisionQAT(retinanet(), dict(bits=BITS),
                              multi_level_act_scales=True)
    head = model.architecture.bbox_head
    leveled = {name: m for name, m in head.named_modules()
               if isinstance(m, PerLevel)}
    assert sorted(leveled) == ['cls_convs.0.conv.act_quantizer',
                               'reg_convs.0.conv.act_quantizer']
    assert not quantizers_ready(model.architecture)
    quantizer = head.cls_convs[0].conv.act_quantizer
    seen = []
    hooks = [copy_.register_forward_pre_hook(
        lambda m, args, level=level: seen.append((level, args[0].clone())))
        for level, copy_ in enumerate(quantizer.levels)]
    x = torch.randn(2, 3, 128, 128)
    for bit in BITS:
        mmdrq.set_bits(model.architecture, bit)
        model(x, mode='tensor')
    for hook in hooks:
        hook.remove()
    assert quantizers_ready(model.architecture)
    assert [level for level, _ in seen] == [0, 1, 2, 3, 4] * len(BITS)
    for index, (level, inp) in enumerate(seen):
        bit = BITS[index // 5]
        alone = ActQuantizer(BITS)
        alone(inp, bit)  # initialised on this level's input only
        row = BITS.index(bit)
        assert quantizer.levels[level].scale[row] == alone.scale[row]
    scales = torch.stack([c.scale for c in quantizer.levels]).detach()
    assert len(set(scales[:, -1].tolist())) == 5
    # a checkpoint without levels gives its scales to every level
    plain = MultiPrecisionQAT(retinanet(), dict(bits=BITS))
    for bit in BITS:
        mmdrq.set_bits(plain.architecture, bit)
        plain(x, mode='tensor')
    model.load_state_dict(plain.state_dict(), strict=True)
    source = plain.architecture.bbox_head.cls_convs[0].conv.act_quantizer
    for copy_ in quantizer.levels:
        torch.testing.assert_close(copy_.scale, source.scale)
    model.load_state_dict(model.state_dict(), strict=True)
    log_vars = model.train_step(det_batch(), mmdrq_optim(model))
    assert all(torch.isfinite(v) for v in log_vars.values())


def test_export_and_deploy_numerics_refuse_level_scales():
    from mmdrq.deploy.onnx_export import check_exportable
    from mmdrq.quantization.deploy_numerics import deploy_numerics
    head = _SharedConvHead()
    _set_level_scales(head, torch.Generator().manual_seed(1))
    head.conv.weight_quantizer.initialized.fill_(True)
    head.conv.weight_quantizer._read_ready()
    with pytest.raises(ValueError, match=r"layer 'conv' .*per FPN level "
                       r'\(multi_level_act_scales=True\)'):
        check_exportable(head)

    def must_not_run(model):
        raise AssertionError('deploy numerics ran a forward before refusing')

    with pytest.raises(ValueError, match=r"deploy numerics: layer 'conv': "
                       r'its input scales are per FPN level'):
        with deploy_numerics(head.eval(), must_not_run):
            pass


@pytest.mark.parametrize('quantizer, value, message', [
    (dict(bits=BITS), 'yes',
     "multi_level_act_scales must be True or False, got 'yes'"),
    (dict(bits=BITS, skip=[r'bbox_head\..*']), True,
     'multi_level_act_scales=True: RetinaHead of RetinaNet has no quantized '
     r'layer with an input quantizer'),
])
def test_bad_act_scale_uses_are_errors(quantizer, value, message):
    with pytest.raises(ValueError, match=message):
        MultiPrecisionQAT(retinanet(), quantizer,
                          multi_level_act_scales=value)
