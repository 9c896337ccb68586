"""Every classification config builds its model and optimizer wrapper and
runs one training iteration (every bit) and one validation step on
synthetic images; no dataset, no download."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper

import mmdrq
from mmdrq.apis import build_model_from_config
from mmdrq.engine import ALRSOptimWrapper
from mmdrq.quantization import TransitionalBatchNorm
from mmdrq.quantization.bit_sampler import BitSampler

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIGS = sorted(
    glob.glob(osp.join(ROOT, 'configs', 'classification', '*.py')))


def build_from_config(path):
    """Model and optimizer wrapper as the Runner builds them, offline."""
    cfg = Config.fromfile(path)
    cfg.model.architecture.backbone.init_cfg = None
    model, _ = build_model_from_config(cfg)
    return cfg, model, build_optim_wrapper(model, cfg.optim_wrapper)


def synthetic_batch(num_classes=1000, size=64, count=2):
    from mmpretrain.structures import DataSample
    return dict(
        inputs=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
                for _ in range(count)],
        # sample_idx, as datasets set it: PS-KD keeps predictions by it
        data_samples=[DataSample(metainfo=dict(sample_idx=i))
                      .set_gt_label(i % num_classes) for i in range(count)])


def test_there_are_configs():
    names = {osp.basename(p) for p in CONFIGS}
    assert {'resnet18_drq-8642_4xb64_in1k.py', 'resnet18_drq-432_4xb64_in1k.py',
            'resnet50_drq-8642_4xb64_in1k.py',
            'mobilenet-v2_drq-864_4xb64_in1k.py'} <= names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_trains_and_validates_one_iteration(path):
    torch.manual_seed(0)
    cfg, model, optim_wrapper = build_from_config(path)
    bits = tuple(cfg.model.quantizer.bits)
    assert model.bits == bits
    assert isinstance(optim_wrapper, ALRSOptimWrapper)
    assert optim_wrapper.bits == bits
    assert 'paper' in open(path).read()  # says which table row it targets
    mixed = '-mp-' in osp.basename(path)
    if mixed:  # from a multi-precision run, with HASB driven by its traces
        assert cfg.load_from.startswith(cfg.multi_precision_dir)
        hook = cfg.custom_hooks[0]
        assert hook.type == 'mmdrq.HASBHook' and \
            hook.traces.startswith(cfg.multi_precision_dir)
        names = list(mmdrq.get_bits(model.architecture))
        model.bit_sampler = BitSampler(
            {n: [1 / len(bits)] * len(bits) for n in names}, bits)
        model.bit_sampler.sigma = 1.0
        assert any(isinstance(m, TransitionalBatchNorm)
                   for m in model.modules())
    else:
        assert cfg.load_from.startswith('https://download.openmmlab.com/')
    alrs = [g for g in optim_wrapper.optimizer.param_groups if g.get('alrs')]
    assert len(alrs) == 1 and alrs[0]['weight_decay'] == 0.0

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log_vars = model.train_step(synthetic_batch(), optim_wrapper)
    for bit in bits:
        assert torch.isfinite(log_vars[f'loss@w{bit}a{bit}'])
    averages = [float(log_vars[f'avg_bit@w{b}a{b}']) for b in bits
                if f'avg_bit@w{b}a{b}' in log_vars]
    # mixed: every pass draws per-layer bits (seeded: the same draws each
    # run), which mix bits; multi-precision passes draw nothing
    assert len(averages) == (len(bits) if mixed else 0)
    assert not mixed or any(a not in bits for a in averages), averages
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(before[n], p)]
    assert any('weight_quantizer.scale' in n for n in changed)
    assert any('act_quantizer.scale' in n for n in changed)

    model.eval()
    for bit in bits:
        with mmdrq.use_bits(model.architecture, bit):
            out = model.val_step(synthetic_batch())
        assert len(out) == 2 and out[0].pred_score.shape == (1000, )
