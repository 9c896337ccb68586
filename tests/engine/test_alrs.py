"""ALRS optimizer wrapper and its constructor."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import mmdrq
from mmdrq.engine import ALRSOptimWrapper, fixed_eta


def alrs_cfg(**kwargs):
    cfg = dict(type='mmdrq.ALRSOptimWrapper',
               constructor='mmdrq.ALRSOptimWrapperConstructor',
               optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01))
    cfg.update(kwargs)
    return cfg


@pytest.mark.parametrize('high, expected', [
    (8, {8: 1.0, 6: 0.1, 4: 0.01, 2: 0.001}),
    (4, {4: 1.0, 3: 0.5, 2: 0.1}),
    (8, {7: 0.5, 5: 0.05, 3: 0.005}),
])
def test_fixed_eta_schedule(high, expected):
    for bit, eta in expected.items():
        assert fixed_eta(bit, high) == pytest.approx(eta, rel=1e-12)


def test_constructor_groups(small_classifier):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 6, 4, 2])
    wrapper = build_optim_wrapper(model, alrs_cfg())
    assert isinstance(wrapper, ALRSOptimWrapper)
    assert wrapper.bits == (8, 6, 4, 2)
    groups = wrapper.optimizer.param_groups
    alrs = [g for g in groups if g.get('alrs')]
    assert len(alrs) == 1 and alrs[0]['weight_decay'] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    alrs_names = {names[id(p)] for p in alrs[0]['params']}
    assert alrs_names == {n for n in names.values() if n.endswith(
        ('weight_quantizer.scale', 'act_quantizer.scale'))}
    others = [p for g in groups if not g.get('alrs') for p in g['params']]
    assert len(others) + len(alrs_names) == len(names)
    assert all(g['weight_decay'] == 0.01 for g in groups if not g.get('alrs'))


@pytest.mark.parametrize('scope', ['scales', 'scales_norm_bias'])
def test_fixed_bit_act_scales_keep_the_plain_lr(small_classifier, scope):
    """An activation scale quantizing at one fixed bit is no bit's scale:
    outside the ALRS group, without weight decay."""
    model = mmdrq.quantize_model(
        small_classifier(), bits=[8, 6, 4, 2],
        act_quantizer=dict(type='ActQuantizer', fixed_bit=8))
    groups = build_optim_wrapper(
        model, alrs_cfg(alrs_scope=scope)).optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    act = {n for n in names.values() if n.endswith('act_quantizer.scale')}
    alrs = {names[id(p)] for g in groups if g.get('alrs')
            for p in g['params']}
    assert act and not act & alrs
    assert any(n.endswith('weight_quantizer.scale') for n in alrs)
    for group in groups:
        if act & {names[id(p)] for p in group['params']}:
            assert group['weight_decay'] == 0.0 and not group.get('alrs')


def test_constructor_norm_bias_scope(small_classifier):
    model = mmdrq.quantize_model(small_classifier(), bits=[4, 3, 2])
    wrapper = build_optim_wrapper(model, alrs_cfg(alrs_scope='scales_norm_bias'))
    alrs = [g for g in wrapper.optimizer.param_groups if g.get('alrs')][0]
    names = {id(p): n for n, p in model.named_parameters()}
    alrs_names = {names[id(p)] for p in alrs['params']}
    assert any('.bns.' in n for n in alrs_names)
    assert any(n.endswith('.bias') for n in alrs_names)
    assert not any(n.endswith('conv1.weight') for n in alrs_names)


def test_step_scales_only_alrs_lr_and_restores_it(small_classifier):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 6, 4, 2])
    wrapper = build_optim_wrapper(
        model, alrs_cfg(optimizer=dict(type='SGD', lr=0.1)))
    scale = model.backbone.layer1[0].conv1.weight_quantizer.scale
    weight = model.backbone.layer1[0].conv1.weight
    for bit in (8, 4):
        wrapper.set_bit(bit)
        scale.grad = torch.ones_like(scale)
        weight.grad = torch.ones_like(weight)
        s0, w0 = scale.detach().clone(), weight.detach().clone()
        wrapper.step()
        eta = fixed_eta(bit, 8)
        torch.testing.assert_close(s0 - scale.detach(),
                                   torch.full_like(s0, 0.1 * eta))
        torch.testing.assert_close(w0 - weight.detach(),
                                   torch.full_like(w0, 0.1))
        assert all(g['lr'] == 0.1 for g in wrapper.optimizer.param_groups)


def test_off_mode_is_plain_lr(small_classifier):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 2])
    wrapper = build_optim_wrapper(
        model, alrs_cfg(mode='off', optimizer=dict(type='SGD', lr=0.1)))
    wrapper.set_bit(2)
    assert wrapper.eta() == 1.0


def adaptive_iteration(wrapper, params, values, seen=None):
    """One step per bit with every ALRS gradient set to ``values[bit]``."""
    for bit, value in values.items():
        wrapper.set_bit(bit)
        for p in params:
            p.grad = torch.full_like(p, value)
        before = params[0].detach().clone()
        wrapper.step()
        if seen is not None:  # the lr used: the step over the gradient
            seen[bit] = float((before - params[0].detach()).mean() / value)


def test_adaptive_mode_normalises_by_gradient_norms(small_classifier):
    """eta_b = n_h / n_b from the previous iterations' norms (they reach
    the host asynchronously); the fixed schedule until both exist; the
    norms still in flight survive a state-dict round trip."""
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 4])

    def build(momentum):
        wrapper = build_optim_wrapper(model, alrs_cfg(
            mode='adaptive', momentum=momentum,
            optimizer=dict(type='SGD', lr=0.1)))
        return wrapper, [p for g in wrapper.optimizer.param_groups
                         if g.get('alrs') for p in g['params']]
    wrapper, params = build(0.5)
    seen = {}
    adaptive_iteration(wrapper, params, {8: 1.0, 4: 8.0}, seen)
    assert seen[4] == pytest.approx(0.1 * fixed_eta(4, 8), rel=1e-5)
    state = wrapper.state_dict()
    assert state['alrs_pending_norms'] == {
        8: pytest.approx(norm_of(params, 1.0)),
        4: pytest.approx(norm_of(params, 8.0))}
    fresh, fresh_params = build(0.5)
    fresh.load_state_dict(state)
    for w, ps in ((wrapper, params), (fresh, fresh_params)):
        seen = {}
        # this iteration's norms: 2 and 4 (ratio 2), last one's: 1 and 8
        adaptive_iteration(w, ps, {8: 2.0, 4: 4.0}, seen)
        # the bit-4 step uses iteration 1 only: the bit-4 norm is 8x
        assert seen[4] == pytest.approx(0.1 / 8, rel=1e-5)
        assert w.eta(4) == pytest.approx(1 / 8, rel=1e-6)
        adaptive_iteration(w, ps, {8: 2.0, 4: 4.0}, seen)
        # moving averages (momentum 0.5): n_8 = 1.5, n_4 = 6 (x the norm
        # of ones)
        assert seen[4] == pytest.approx(0.1 * 1.5 / 6, rel=1e-5)


def norm_of(params, value):
    return sum(p.numel() for p in params) ** 0.5 * value


def test_bad_inputs_name_key_and_value(small_classifier):
    plain = small_classifier()
    with pytest.raises(ValueError, match='quantize_model'):
        build_optim_wrapper(plain, alrs_cfg())
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 6, 4, 2])
    with pytest.raises(ValueError, match=r'optim_wrapper.bits=\[8, 4\].*'
                       r'\[8, 6, 4, 2\]'):
        build_optim_wrapper(model, alrs_cfg(bits=[8, 4]))
    with pytest.raises(ValueError, match="mode.*'fast'"):
        build_optim_wrapper(model, alrs_cfg(mode='fast'))
    with pytest.raises(ValueError, match="alrs_scope.*'all'"):
        build_optim_wrapper(model, alrs_cfg(alrs_scope='all'))
    wrapper = build_optim_wrapper(model, alrs_cfg())
    with pytest.raises(ValueError, match='optim_wrapper.bit=3'):
        wrapper.set_bit(3)
    # a plain optimizer (no alrs group) handed to the wrapper directly
    with pytest.raises(ValueError, match='no quantizer parameters'):
        ALRSOptimWrapper(torch.optim.SGD(nn.Linear(2, 2).parameters(), 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='AmpOptimWrapper needs a GPU')
def test_amp_variant_builds(small_classifier):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 4]).cuda()
    wrapper = build_optim_wrapper(
        model, alrs_cfg(type='mmdrq.ALRSAmpOptimWrapper'))
    assert wrapper.bits == (8, 4)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='AmpOptimWrapper needs a GPU')
def test_amp_adaptive_norms_exclude_the_loss_scale(small_classifier):
    """The adaptive norms are those of the true gradients, whatever the
    loss scale was when they were taken."""
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 4]).cuda()
    for loss_scale in (dict(init_scale=1024.0, growth_interval=1),
                       dict(enabled=False)):  # the scale doubles each step
        wrapper = build_optim_wrapper(model, alrs_cfg(
            type='mmdrq.ALRSAmpOptimWrapper', mode='adaptive', momentum=0.0,
            loss_scale=loss_scale, optimizer=dict(type='SGD', lr=0.0)))
        params = [p for g in wrapper.optimizer.param_groups if g.get('alrs')
                  for p in g['params']]
        wrapper.loss_scaler.scale(torch.ones((), device='cuda'))  # init
        for bit in (8, 4, 8, 4):
            wrapper.set_bit(bit)
            scale = wrapper.loss_scaler.get_scale()  # 1.0 when disabled
            for p in params:  # as the scaled loss's backward leaves them
                p.grad = torch.full_like(p, scale * (1.0 if bit == 8 else 8.))
            wrapper.step()
        expected = norm_of(params, 1.0)
        assert wrapper.grad_norms[8] == pytest.approx(expected, rel=1e-4)
        assert wrapper.grad_norms[4] == pytest.approx(8 * expected, rel=1e-4)


@pytest.mark.parametrize('key,value,allowed', [
    ('momentum', 1.0, r'\[0, 1\)'), ('momentum', -0.1, r'\[0, 1\)'),
    ('momentum', 'high', r'\[0, 1\)'), ('min_eta', 0, r'\(0, 1\]'),
    ('min_eta', 2.0, r'\(0, 1\]'), ('min_eta', True, r'\(0, 1\]')])
def test_bad_adaptive_settings_name_key_and_value(small_classifier, key,
                                                  value, allowed):
    model = mmdrq.quantize_model(small_classifier(), bits=[8, 4])
    with pytest.raises(ValueError, match=f'optim_wrapper.{key} must be a '
                       f'number in {allowed}, got {value!r}'):
        build_optim_wrapper(model, alrs_cfg(mode='adaptive', **{key: value}))
