"""Every option key of the wrapper, the quantizer, the ALRS optimizer and
the hooks, given a value of the wrong type or range, stops with an error
that names the key and the value, before any training work: built
in-process as tools/train.py builds them (the model, the optimizer wrapper,
the hooks), from the digits config."""
import copy
import os.path as osp
import re

import pytest
from mmengine.config import Config
from mmengine.registry import HOOKS as MMENGINE_HOOKS

from conftest import DIGITS
from mmdrq.apis import build_model_from_config

QAT_CFG = osp.join(DIGITS, 'resnet_digits_drq_8642.py')

MODEL_CASES = [
    ('model.head_distill', 5, 'head_distill must be a dict'),
    ('model.head_distill', dict(wieght=1.0), "unknown head_distill key"),
    ('model.head_distill', dict(weight='a'),
     "head_distill.weight must be a positive number, got 'a'"),
    ('model.multi_level_norm', 'yes',
     "multi_level_norm must be True or False, got 'yes'"),
    ('model.multi_level_act_scales', 3,
     'multi_level_act_scales must be True or False, got 3'),
    ('model.bit_loss_weights', [1, 2],
     r'bit_loss_weights must be a dict \{bit: factor\}, got \[1, 2\]'),
    ('model.bit_loss_weights', {'8': -1},
     'bit_loss_weights\\[8\\] must be a positive number, got -1'),
    ('model.loss_mode', 'summed', "loss_mode must be one of"),
    ('model.quantizer.act_quantizer.init_method', 3,
     r"init_method must be one of \['percentile', 'mse'\], got 3"),
    ('model.quantizer.switchable_gn_ln', 'no',
     "switchable_gn_ln must be True or False, got 'no'"),
    ('model.quantizer.weight_quantizer.per_channel', 'yes',
     "per_channel must be True or False, got 'yes'"),
    ('model.quantizer.bits', [], 'bits'),
]


@pytest.mark.parametrize('key, value, message', MODEL_CASES,
                         ids=[f'{c[0]}={c[1]!r}' for c in MODEL_CASES])
def test_model_option_errors_name_key_and_value(key, value, message):
    cfg = Config.fromfile(QAT_CFG)
    cfg.merge_from_dict({key: value})
    with pytest.raises(ValueError, match=message):
        build_model_from_config(cfg)


HOOK_CASES = [
    (dict(type='mmdrq.FreezeBNStatsHook', begin='x'),
     "FreezeBNStatsHook begin must be an int >= 0, got 'x'"),
    (dict(type='mmdrq.FreezeBNStatsHook', begin=1, bit_begin=5),
     r'FreezeBNStatsHook bit_begin must be a dict \{bit: iteration\}, '
     'got 5'),
    (dict(type='mmdrq.FreezeBNStatsHook', bit_begin={'8': 'a'}),
     "FreezeBNStatsHook bit_begin\\['8'\\] must be an int >= 0, got 'a'"),
    (dict(type='mmdrq.HASBHook', uniform=2.0),
     'HASBHook uniform must be True or False, got 2.0'),
    (dict(type='mmdrq.HASBHook', uniform=True, warmup_epochs=-2),
     'HASBHook warmup_epochs must be an int >= 0, got -2'),
]


@pytest.mark.parametrize('hook, message', HOOK_CASES,
                         ids=[str(c[0]) for c in HOOK_CASES])
def test_hook_option_errors_name_key_and_value(hook, message):
    import mmdrq  # noqa: F401 (registers the hooks)
    with pytest.raises(ValueError, match=message):
        MMENGINE_HOOKS.build(copy.deepcopy(hook))


@pytest.mark.parametrize('key, value, message', [
    ('alrs_modules', 5, 'alrs_modules must be a list of module names, got 5'),
    ('alrs_scope', 'all', "alrs_scope must be one of"),
    ('mode', 'linear', "optim_wrapper.mode must be one of"),
])
def test_optimizer_option_errors_name_key_and_value(key, value, message):
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile(QAT_CFG)
    model, _ = build_model_from_config(cfg)
    optim_cfg = copy.deepcopy(cfg.optim_wrapper)
    optim_cfg[key] = value
    with pytest.raises(ValueError, match=re.compile(message)):
        build_optim_wrapper(model, optim_cfg)
