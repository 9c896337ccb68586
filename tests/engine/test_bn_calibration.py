"""BN re-calibration: inside the block every BN holds the equal-weight
average of its batch statistics over the calibration batches (checked
against a float64 reference of the same forward), and everything is put
back after; the test loop calibrates each setting on the config's training
batches and leaves the checkpoint's model unchanged."""
import copy
import os.path as osp
import uuid

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.runner import Runner
from torch import nn

from mmdrq.engine.bn_calibration import calibrated_bn, check_bn_calibration


def _reference(model, batches):
    """Per BN, (mean of batch means, mean of unbiased batch variances) of
    its input, in float64, each BN normalising by its batch's statistics."""
    conv1, bn1, _, conv2, bn2 = [m.double() for m in model]
    stats = {0: [], 1: []}
    for x in batches:
        h = conv1(x.double())
        stats[0].append((h.mean((0, 2, 3)), h.var((0, 2, 3))))
        h = F.relu(F.batch_norm(h, None, None, bn1.weight, bn1.bias,
                                training=True, eps=bn1.eps))
        h = conv2(h)
        stats[1].append((h.mean((0, 2, 3)), h.var((0, 2, 3))))
    return {i: tuple(torch.stack(v).mean(0) for v in zip(*s))
            for i, s in stats.items()}


def test_statistics_are_the_batches_and_restored_after():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5, momentum=0.3))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.uniform_(0.5, 2)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(6, 3, 9, 9) * 3 + 1 for _ in range(4)]
    expected = _reference(copy.deepcopy(model), batches[:3])
    with calibrated_bn(model, iter(batches), 3, model) as inside:
        assert inside is model and not model.training
        for index, bn in ((0, model[1]), (1, model[4])):
            assert not bn.training and int(bn.num_batches_tracked) == 3
            torch.testing.assert_close(bn.running_mean.double(),
                                       expected[index][0])
            torch.testing.assert_close(bn.running_var.double(),
                                       expected[index][1])
    assert model.training and model[4].momentum == 0.3
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_no_batches_is_an_error_and_restores():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = model[1].running_var.clone()
    with pytest.raises(ValueError, match='no batches'):
        with calibrated_bn(model, iter([]), 2, model):
            pass
    assert torch.equal(model[1].running_var, before)


@pytest.mark.parametrize('cfg, message', [
    (dict(batch=2), r"unknown test_cfg.bn_calibration key\(s\) \['batch'\]"),
    (dict(batches=0), 'test_cfg.bn_calibration.batches must be an int >= 1, '
     'got 0'),
    (8, 'test_cfg.bn_calibration must be None or dict'),
])
def test_bad_option_names_key_and_value(cfg, message):
    with pytest.raises(ValueError, match=message):
        check_bn_calibration(cfg, 'test_cfg.bn_calibration')


def _runner(tmp_path, data_root, bn_calibration, with_train=True):
    """The digits example's QAT config on the real Runner (random weights:
    what is checked is the loop, not the accuracy)."""
    from conftest import DIGITS
    cfg = Config.fromfile(osp.join(DIGITS, 'resnet_digits_drq_8642.py'))
    for key in ('train', 'val', 'test'):
        cfg[f'{key}_dataloader'].dataset.data_root = data_root
    cfg.test_cfg.bn_calibration = bn_calibration
    if not with_train:
        cfg.train_dataloader = cfg.train_cfg = cfg.optim_wrapper = \
            cfg.param_scheduler = None
    cfg.work_dir = str(tmp_path)
    cfg.experiment_name = f'bn_{uuid.uuid4().hex}'
    cfg.load_from = None
    return Runner.from_cfg(cfg)


def test_test_loop_calibrates_each_setting_and_keeps_the_model(
        tmp_path, digits_data):
    from mmdrq.models import architecture_of
    from mmdrq.quantization import use_setting
    torch.manual_seed(0)
    runner = _runner(tmp_path, digits_data, dict(batches=2))
    norms = ('running_mean', 'running_var', 'num_batches_tracked')
    before = {k: v.clone() for k, v in runner.model.state_dict().items()
              if k.endswith(norms)}
    metrics = runner.test()
    assert {f'accuracy/top1@w{b}a{b}' for b in (8, 6, 4, 2)} <= set(metrics)
    after = runner.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # nothing carries over from one run to the next
    assert runner.test() == metrics
    # the same as calibrating by hand on the first two training batches
    arch = architecture_of(runner.model)
    batches = runner.build_dataloader(runner.cfg.train_dataloader,
                                      seed=runner.seed)

    def forward(batch):
        data = arch.data_preprocessor(batch, False)
        arch(data['inputs'], data['data_samples'], mode='tensor')

    correct = total = 0
    with use_setting(arch, 4), calibrated_bn(
            arch, iter(batches), 2, forward, seed=runner.seed), \
            torch.no_grad():
        for batch in runner.build_dataloader(runner.cfg.test_dataloader):
            for sample in arch.test_step(batch):
                correct += int(sample.pred_label == sample.gt_label)
                total += 1
    assert metrics['accuracy/top1@w4a4'] == pytest.approx(
        100 * correct / total)


def test_test_loop_without_training_batches_is_refused(tmp_path,
                                                       digits_data):
    runner = _runner(tmp_path, digits_data, dict(batches=2),
                     with_train=False)
    with pytest.raises(ValueError, match='needs the config.s train_dataloader'):
        runner.test()
