"""Configs with the low-bit detection/segmentation options (docs/lowbit.md)
train through tools/train.py on the tiny datasets, and their checkpoints
reproduce the per-bit validation through tools/test.py."""
import json
import math
import os.path as osp
import re

import pytest

from conftest import ROOT, TOOLS, logged, run_tool, tiny_data_options

pytestmark = pytest.mark.slow  # trains through the tools

BITS = (8, 6, 4, 2)
CASES = {
    'retinanet': ('configs/detection/retinanet_r18_drq-8642_tiny.py', 'coco',
                  'epoch_1.pth', 'coco/bbox_mAP', """
model = dict(
    architecture=dict(bbox_head=dict(
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True))),
    multi_level_norm=True,
    multi_level_act_scales=True,
    head_distill=dict(target='logits', weight=1.0, temperature=2.0,
                      box_weight=0.5),
    bit_loss_weights={2: 2.0})
optim_wrapper = dict(alrs_modules=['bbox_head'])
"""),
    'deeplabv3': ('configs/segmentation/deeplabv3_r18_drq-8642_tiny.py',
                  'ade20k', 'iter_4.pth', 'mIoU', """
model = dict(head_distill=dict(target='logits', temperature=2.0),
             bit_loss_weights={2: 2.0, 4: 1.5},
             quantizer=dict(act_quantizer=dict(init_method='mse')))
optim_wrapper = dict(alrs_modules=['decode_head'])
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=1,
                     bit_begin={2: 2})]
"""),
}


@pytest.mark.parametrize('name', list(CASES))
def test_options_train_and_reload(name, data, tmp_path):
    base, dataset, ckpt, metric, extra = CASES[name]
    config = tmp_path / f'{name}_lowbit.py'
    config.write_text(f'_base_ = {osp.join(ROOT, base)!r}\n{extra}')
    options = ['--cfg-options'] + tiny_data_options(dataset, data[dataset])
    work = tmp_path / 'work'
    _, log = run_tool(osp.join(TOOLS, 'train.py'), config, '--work-dir',
                      work, *options)
    if name == 'retinanet':
        # the passes' rows in the one conversion table (padded columns)
        assert re.search(r'bbox_head\.cls_convs\.0\.gn +\| SwitchableNorm +'
                         r'\| norm per FPN level \(5\)', log)
        assert re.search(r'bbox_head\.reg_convs\.0\.conv\.act_quantizer +\| '
                         r'ActQuantizer +\| activation scales per FPN level '
                         r'\(5\)', log)
        assert 'switchable norm (follows bbox_head.cls_convs.0.conv)' in log
    assert logged(log, 'loss_distill@w8a8') == []
    for bit in BITS[1:]:
        values = logged(log, f'loss_distill@w{bit}a{bit}')
        assert values and all(math.isfinite(v) and v >= 0 for v in values)
    val = {bit: logged(log, f'{metric}@w{bit}a{bit}') for bit in BITS}
    assert all(val.values()), val

    out = tmp_path / 'metrics.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), config, work / ckpt,
                      '--work-dir', tmp_path / 'test', '--out', out,
                      *options)
    metrics = json.loads(out.read_text())
    for bit in BITS:
        assert abs(metrics[f'{metric}@w{bit}a{bit}'] - val[bit][-1]) < 1e-3


def test_bad_option_fails_before_training(data, tmp_path):
    base = CASES['retinanet'][0]
    config = tmp_path / 'bad.py'
    config.write_text(f'_base_ = {osp.join(ROOT, base)!r}\n'
                      'model = dict(bit_loss_weights={3: 2.0})\n')
    code, log = run_tool(osp.join(TOOLS, 'train.py'), config, '--work-dir',
                         tmp_path / 'work', '--cfg-options',
                         *tiny_data_options('coco', data['coco']),
                         expect_ok=False)
    assert code != 0
    assert 'bit_loss_weights key=3 is not one of the bits [8, 6, 4, 2]' in log
    assert 'Epoch(train)' not in log
