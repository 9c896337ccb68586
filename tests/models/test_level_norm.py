"""Multi-level norms in shared detection heads (AQD's multi-level BN)."""
import pytest
import torch

import mmdrq
from conftest import RETINANET_CFG, build_openmmlab_model
from mmdrq.models import MultiPrecisionQAT
from mmdrq.models.level_norm import LevelNorm
from mmdrq.quantization.switchable_bn import SwitchableBatchNorm
from test_head_distill import TINY_RETINA, det_batch

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
    norms = [m for m in head.modules() if isinstance(m, LevelNorm)]
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
