"""docs/options.md against the code: every argument of every class a config
builds is a row of its table, no row names an argument that is gone, and
each simple default is the one the signature has."""
import ast
import dataclasses
import inspect
import os.path as osp
import re

import pytest

from mmdrq.deploy.loop import OnnxRuntimeTestLoop
from mmdrq.engine.alrs import ALRSOptimWrapper
from mmdrq.engine.freeze_bn_hook import FreezeBNStatsHook
from mmdrq.engine.hasb_hook import HASBHook
from mmdrq.engine.loops import MultiBitValLoop
from mmdrq.models import MultiPrecisionQAT, MultiPrecisionQATDDP
from mmdrq.models.bit_schedule import BitSchedule
from mmdrq.models.fp_distill import FPDistillStep
from mmdrq.models.head_distill import HeadDistill
from mmdrq.models.pskd import PSKDTargets
from mmdrq.quantization import (ActQuantizer, DoubleRoundingQuantizer,
                                QuantizeConfig)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
# arguments MMEngine or the caller fills in, not the config
FILLED = {'self', 'runner', 'dataloader', 'evaluator', 'optimizer', 'module',
          'kwargs'}


def tables():
    """{label: {key: default cell}}: a table is labelled by the heading or
    the 'Sub-keys of `x`' line above it; a hooks table row with an empty
    first cell belongs to the hook above it."""
    with open(osp.join(ROOT, 'docs', 'options.md')) as f:
        lines = f.read().splitlines()
    found, label, hook = {}, None, None
    for line in lines:
        heading = re.match(r'#+ (.*)', line)
        sub = re.match(r'Sub-keys of `(\w+)`', line)
        if heading or sub:
            label = sub.group(1) if sub else heading.group(1)
            continue
        if not line.startswith('| ') or line.startswith(('| key', '| hook')):
            continue
        cells = [c.strip() for c in line.strip('|').split('|')]
        if label == 'Hooks':
            hook = re.match(r'`mmdrq\.(\w+)`', cells[0]).group(1) \
                if cells[0] else hook
            key, default = cells[1], cells[3]
            table = found.setdefault(hook, {})
        else:
            key, default = cells[0], cells[2]
            table = found.setdefault(label, {})
        match = re.fullmatch(r'`(\w+)`', key)
        if match:
            table[match.group(1)] = default
    return found


def arguments(target, filled=()):
    """{name: default or inspect.Parameter.empty} of a class's config
    arguments (a dataclass's fields), without those in ``filled``."""
    if dataclasses.is_dataclass(target):
        return {f.name: f.default if f.default is not dataclasses.MISSING
                else f.default_factory() for f in dataclasses.fields(target)}
    return {name: p.default for name, p in
            inspect.signature(target.__init__).parameters.items()
            if name not in FILLED and name not in filled}


SECTIONS = [
    ("1. `model=dict(type='mmdrq.MultiPrecisionQAT', ...)`",
     MultiPrecisionQAT),
    ('bit_schedule', BitSchedule, {'bits'}),
    ('distill', PSKDTargets, {'num_classes'}),
    ('head_distill', HeadDistill, {'architecture'}),
    ('fp_distill', FPDistillStep, {'architecture'}),
    ("`model_wrapper_cfg=dict(type='mmdrq.MultiPrecisionQATDDP')`",
     MultiPrecisionQATDDP),
    ('2. `model.quantizer` (`QuantizeConfig`)', QuantizeConfig),
    ('`weight_quantizer` (`DoubleRoundingQuantizer`)',
     DoubleRoundingQuantizer, {'bits', 'num_channels'}),
    ('`act_quantizer` (`ActQuantizer`)', ActQuantizer, {'bits'}),
    ('`optim_wrapper` (ALRS)', ALRSOptimWrapper, {'bits'}),
    ('FreezeBNStatsHook', FreezeBNStatsHook),
    ('HASBHook', HASBHook),
    ('Loops: `val_cfg` / `test_cfg`', MultiBitValLoop),
    ("ONNX Runtime test loop: `test_cfg=dict(type='mmdrq."
     "OnnxRuntimeTestLoop', ...)`", OnnxRuntimeTestLoop),
]
# keys a table adds beside the signature: read from the optimizer
# wrapper's config by the constructor, and the bits it fills in
EXTRA = {'`optim_wrapper` (ALRS)': {'alrs_scope', 'alrs_modules', 'bits'}}


@pytest.mark.parametrize('section', SECTIONS,
                         ids=[section[1].__name__ for section in SECTIONS])
def test_table_lists_every_argument_with_its_default(section):
    label, target, *filled = section
    table = tables()[label]
    args = arguments(target, *filled)
    assert set(table) == set(args) | EXTRA.get(label, set())
    for name, default in args.items():
        cell = table[name]
        if default is inspect.Parameter.empty:
            assert cell.startswith('required'), (name, cell)
        elif default is None or isinstance(
                default, (bool, int, float, str, list, tuple)):
            shown = re.match(r'`([^`]*)`', cell)
            assert shown, (name, default, cell)
            value = ast.literal_eval(shown.group(1))
            assert value == default or (isinstance(default, tuple) and
                                        value == list(default)), \
                (name, default, cell)
