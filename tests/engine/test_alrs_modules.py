"""ALRS on named modules' parameters (optim_wrapper.alrs_modules)."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper

import mmdrq
from mmdrq.engine import fixed_eta
from mmdrq.models import MultiPrecisionQAT


def alrs_cfg(**kwargs):
    return dict(type='mmdrq.ALRSOptimWrapper',
                constructor='mmdrq.ALRSOptimWrapperConstructor',
                optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01),
                **kwargs)


def test_head_parameters_get_the_per_bit_rate(small_classifier):
    # names are the architecture's, also inside the QAT wrapper
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 6, 4, 2]))
    wrapper = build_optim_wrapper(model, alrs_cfg(alrs_modules=['head']))
    names = {id(p): n for n, p in model.named_parameters()}
    alrs = {names[id(p)]: g['weight_decay']
            for g in wrapper.optimizer.param_groups if g.get('alrs')
            for p in g['params']}
    head = {n for n in names.values() if n.startswith('architecture.head.')}
    assert head and head <= set(alrs)
    assert alrs['architecture.head.fc.weight'] == 0.01  # keeps its decay
    assert not any(n.startswith('architecture.backbone.') and
                   n.endswith('conv1.weight') for n in alrs)
    fc = model.architecture.head.fc.weight
    conv = model.architecture.backbone.layer1[0].conv1.weight
    for bit in (8, 2):
        wrapper.zero_grad()
        wrapper.set_bit(bit)
        fc.grad, conv.grad = torch.ones_like(fc), torch.ones_like(conv)
        fc0, conv0 = fc.detach().clone(), conv.detach().clone()
        wrapper.step()
        # SGD with decay: lr * (grad + wd * w), lr times eta_b for the head
        eta = fixed_eta(bit, 8)
        torch.testing.assert_close(fc0 - fc.detach(),
                                   0.1 * eta * (1 + 0.01 * fc0))
        torch.testing.assert_close(conv0 - conv.detach(),
                                   0.1 * (1 + 0.01 * conv0))


@pytest.mark.parametrize('value, message', [
    (['bbox_head'], "alrs_modules entry 'bbox_head' is no module of "
     "ImageClassifier"),
    ('head', "alrs_modules must be a list of module names, got 'head'"),
    (5, 'alrs_modules must be a list of module names, got 5'),
])
def test_bad_alrs_modules_name_key_and_value(small_classifier, value,
                                             message):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 2])
    with pytest.raises(ValueError, match=message):
        build_optim_wrapper(model, alrs_cfg(alrs_modules=value))


def test_norm_bias_scope_takes_switchable_gn_and_ln():
    from torch import nn
    model = mmdrq.quantize_model(nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4),
        nn.Flatten(), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
        bits=[8, 4, 2])
    wrapper = build_optim_wrapper(model,
                                  alrs_cfg(alrs_scope='scales_norm_bias'))
    names = {id(p): n for n, p in model.named_parameters()}
    alrs = {names[id(p)] for g in wrapper.optimizer.param_groups
            if g.get('alrs') for p in g['params']}
    for norm in ('2', '5'):
        assert {f'{norm}.bns.{b}.weight' for b in (8, 4, 2)} <= alrs
    assert '1.weight' not in alrs and '4.weight' not in alrs
