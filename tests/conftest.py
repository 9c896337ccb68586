"""Shared helpers: OpenMMLab models built offline and a tiny plain-torch CNN.

Nothing here downloads weights: every model config gets ``init_cfg=None`` on
its backbone and ``pretrained=None`` where the key exists, and
``init_weights`` is never called.
"""
import hashlib
import importlib
import importlib.util
import logging
import os
import os.path as osp
import re
import subprocess
import sys
import tempfile
import uuid

import numpy as np
import pytest
import torch
from mmengine.optim import OptimWrapper
from torch import nn
from torch.utils.data import Dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
DIGITS = osp.join(ROOT, 'configs', 'classification', 'digits')
RESNET18_CFG = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
RETINANET_CFG = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
DEEPLABV3_CFG = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py'

# mmseg configs use SyncBN, which needs a process group: plain BN on CPU.
CPU_BN = dict(type='BN', requires_grad=True)
DEEPLAB_CPU_OPTIONS = {
    'model.backbone.norm_cfg': CPU_BN,
    'model.decode_head.norm_cfg': CPU_BN,
    'model.auxiliary_head.norm_cfg': CPU_BN,
}


def build_openmmlab_model(scope: str, base_cfg: str, cfg_options=None):
    """Build the model of an OpenMMLab config offline.

    Writes a temporary config whose ``_base_`` is ``base_cfg`` (e.g.
    ``'mmpretrain::resnet/resnet18_8xb32_in1k.py'``), loads it with MMEngine,
    applies ``cfg_options`` (dotted keys, as ``--cfg-options``), removes every
    pretrained-weight reference, sets the default scope to ``scope`` and
    builds ``cfg.model`` with ``scope``'s MODELS registry.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'model_cfg.py')
        with open(path, 'w') as f:
            f.write(f'_base_ = {base_cfg!r}\n')
        cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    model_cfg = cfg.model
    if model_cfg.get('backbone') is not None:
        model_cfg.backbone.init_cfg = None
        if 'pretrained' in model_cfg.backbone:
            model_cfg.backbone.pretrained = None
    if 'pretrained' in model_cfg:
        model_cfg.pretrained = None
    if 'init_cfg' in model_cfg and model_cfg.init_cfg is not None and \
            'Pretrained' in str(model_cfg.init_cfg):
        model_cfg.init_cfg = None
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    return registry.build(model_cfg)


@pytest.fixture
def openmmlab_model():
    """The builder above as a fixture: ``openmmlab_model(scope, base_cfg)``."""
    return build_openmmlab_model


class MyConv(nn.Conv2d):
    """A user conv subclass with its own forward: must stay FP."""

    def forward(self, x):
        return super().forward(x) * 0.5


class TinyCNN(nn.Module):
    """Small CNN covering conv (with and without bias, grouped), BN, linear.

    ``conv1`` has 7 * width * 9 weights: odd for the default ``width=5``, so
    int4x2 packing needs its pad nibble. ``stem`` (first) and ``fc2`` (last
    layer) are the layers ``skip_first_last`` keeps FP.
    """

    def __init__(self, width: int = 5, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, 7, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 9)
        self.fc2 = nn.Linear(9, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = x.mean(dim=(2, 3))
        return self.fc2(self.relu(self.fc1(x)))


# One intra-op thread: on a small shared CPU box, OpenMP workers spinning
# against other processes made these tests ~9x slower; the inputs here are
# too small for a second thread to help.
torch.set_num_threads(1)

TINY_QUANT_LAYERS = ('conv1', 'conv2', 'conv3', 'fc1')


@pytest.fixture
def make_tiny_cnn():
    """Factory of TinyCNN models with a given seed (different weights)."""

    def make(seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return TinyCNN(**kwargs)

    return make


@pytest.fixture
def mmengine_caplog(caplog):
    """caplog that also sees MMEngine's current logger (it has no parent,
    so its records never reach the root logger caplog listens to)."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def total_loss(losses: dict) -> torch.Tensor:
    """Sum of the ``loss*`` entries of an OpenMMLab loss dict (values may be
    tensors or lists of tensors)."""
    total = 0
    for key, value in losses.items():
        if 'loss' not in key:
            continue
        if isinstance(value, (list, tuple)):
            value = sum(value)
        total = total + value
    return total


@pytest.fixture
def sum_losses():
    return total_loss


def build_small_classifier():
    """A small real mmpretrain ImageClassifier (CIFAR-stem ResNet with
    16/32/64 channels, 10 classes): the digits example's model."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='ResNet_CIFAR', depth=18, num_stages=3,
                      stem_channels=16, base_channels=16,
                      strides=(1, 2, 2), dilations=(1, 1, 1),
                      out_indices=(2, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=64)))


@pytest.fixture
def small_classifier():
    """Factory of ``build_small_classifier`` models."""
    return build_small_classifier


@pytest.fixture(params=['torch', 'fused'])
def fake_quant_path(request):
    """Runs a test once per fake-quant implementation. ``fused`` raises
    instead of falling back, so a test on it cannot pass through the torch
    path by accident."""
    from mmdrq.quantization import functional, fused_kernels
    with functional.fake_quant_impl(request.param):
        yield request.param
    if request.param == 'fused':
        assert not fused_kernels.failed('cpu')


def run_tool(*args, expect_ok=True, timeout=600):
    """Run a script in a fresh Python (one OpenMP thread, the repo on the
    path); returns (return code, stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    done = subprocess.run([sys.executable] + [str(a) for a in args],
                          capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    output = done.stdout + done.stderr
    if expect_ok:
        assert done.returncode == 0, output[-4000:]
    return done.returncode, output


def tool_error(tool: str, *argv) -> str:
    """Run ``tools/<tool>.py``'s ``main`` in this process with ``argv``,
    expecting it to stop with an error before any work (the cases that
    only check an error message need no new interpreter); returns the
    error's type and message, or what argparse printed."""
    import contextlib
    import io
    spec = importlib.util.spec_from_file_location(
        f'tool_{tool}', osp.join(TOOLS, f'{tool}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv_before, printed = sys.argv, io.StringIO()
    sys.argv = [f'{tool}.py'] + [str(a) for a in argv]
    try:
        with contextlib.redirect_stderr(printed):
            module.main()
    except SystemExit as exit_:
        assert exit_.code not in (0, None), printed.getvalue()
        return printed.getvalue()
    except Exception as error:  # the error the tool stops with
        return f'{type(error).__name__}: {error}'
    finally:
        sys.argv = argv_before
    raise AssertionError(f'tools/{tool}.py {list(argv)} did not fail')


def write_digits_config(folder, name, base, data_root, extra='',
                        train_images=128, eval_images=96):
    """A config inheriting ``base`` on a subset of the digits at
    ``data_root``, with no random augmentation (so a resumed run replays the
    same batches); ``extra`` is appended as config text."""
    path = osp.join(folder, name)
    with open(path, 'w') as f:
        f.write(f"""_base_ = {base!r}
data_root = {data_root!r}
_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(16, 16)),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=32, dataset=dict(
    data_root=data_root, pipeline=_pipeline, indices={train_images}))
val_dataloader = dict(dataset=dict(data_root=data_root, indices={eval_images}))
test_dataloader = dict(dataset=dict(data_root=data_root, indices={eval_images}))
default_hooks = dict(logger=dict(interval=1))
{extra}
""")
    return path


def tiny_data_options(kind: str, root: str) -> list:
    """``--cfg-options`` pointing a ``*_tiny`` config at the dataset that
    tools/make_tiny_datasets.py wrote to ``root`` (``kind``: ``coco`` or
    ``ade20k``; COCO's evaluators read the annotation file too)."""
    from mmdrq.utils.tool_runs import data_options
    if kind == 'ade20k':
        return data_options(root)
    ann = osp.join(root, 'annotations', 'instances_val.json')
    return data_options(root + '/') + [f'val_evaluator.ann_file={ann}',
                                       f'test_evaluator.ann_file={ann}']


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """The tiny COCO and ADE20K datasets, written once per session by
    tools/make_tiny_datasets.py as a user runs it (read only)."""
    folder = tmp_path_factory.mktemp('tiny_data')
    coco, ade = str(folder / 'tiny_coco'), str(folder / 'tiny_ade20k')
    _, log = run_tool(osp.join(TOOLS, 'make_tiny_datasets.py'), '--coco-root',
                      coco, '--ade20k-root', ade)
    assert 'tiny COCO written' in log and 'tiny ADE20K written' in log
    return dict(coco=coco, ade20k=ade)


@pytest.fixture(scope='session')
def tiny_training(data, tmp_path_factory):
    """``tiny_training(config, dataset) -> (work_dir, log)``: tools/train.py
    on a ``*_tiny`` config and the tiny dataset, run once per session; the
    tests that read its log or checkpoint share it (read only)."""
    runs = {}

    def train(config: str, dataset: str):
        config = osp.join(ROOT, config)
        if config not in runs:
            work = tmp_path_factory.mktemp('tiny_work')
            _, log = run_tool(osp.join(TOOLS, 'train.py'), config,
                              '--work-dir', work, '--cfg-options',
                              *tiny_data_options(dataset, data[dataset]))
            runs[config] = work, log
        return runs[config]

    return train


@pytest.fixture(scope='session')
def digits_data(tmp_path_factory):
    """The digits, written once per session by tools/prepare_digits.py
    (read only): the data root."""
    data_root = str(tmp_path_factory.mktemp('digits_data') / 'data')
    run_tool(osp.join(TOOLS, 'prepare_digits.py'), '--root', data_root)
    return data_root


@pytest.fixture(scope='session')
def digits(digits_data, tmp_path_factory):
    """A 2-epoch FP32 digits checkpoint on a subset and a QAT config
    starting from it (checkpoints every epoch), once per session."""
    folder = tmp_path_factory.mktemp('digits')
    data_root = digits_data
    fp_cfg = write_digits_config(
        folder, 'fp32.py', osp.join(DIGITS, 'resnet_digits_fp32.py'),
        data_root, 'train_cfg = dict(max_epochs=2, val_interval=2)\n'
        'param_scheduler = dict(T_max=2)')
    run_tool(osp.join(TOOLS, 'train.py'), fp_cfg, '--work-dir',
             folder / 'fp32')
    fp_ckpt = str(folder / 'fp32' / 'epoch_2.pth')
    qat_cfg = write_digits_config(
        folder, 'qat.py', osp.join(DIGITS, 'resnet_digits_drq_8642.py'),
        data_root, f'load_from = {fp_ckpt!r}\n'
        'train_cfg = dict(max_epochs=2, val_interval=1)\n'
        # an explicit end: a run cut short keeps the same schedule
        'param_scheduler = dict(T_max=2, begin=0, end=2)\n'
        "default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=3))")
    return dict(folder=folder, data_root=data_root, qat_cfg=qat_cfg,
                fp_ckpt=fp_ckpt)


@pytest.fixture(scope='session')
def qat_run(digits):
    """tools/train.py on the digits QAT config, once per session: (work dir
    with epoch_1.pth and epoch_2.pth, log); read only."""
    work = digits['folder'] / 'qat'
    _, log = run_tool(osp.join(TOOLS, 'train.py'), digits['qat_cfg'],
                      '--work-dir', work)
    return work, log


TINY_RETINA = {
    'model.backbone.depth': 18, 'model.backbone.init_cfg': None,
    'model.neck.in_channels': [64, 128, 256, 512],
    'model.neck.out_channels': 8, 'model.bbox_head.in_channels': 8,
    'model.bbox_head.feat_channels': 8, 'model.bbox_head.stacked_convs': 1,
    'model.bbox_head.num_classes': 3,
}


def det_batch():
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(3)
    samples = []
    for i in range(2):
        sample = DetDataSample(metainfo=dict(
            img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64),
            scale_factor=(1.0, 1.0), batch_input_shape=(64, 64)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor([[4.0 + i, 6.0, 40.0, 50.0]]),
            labels=torch.tensor([i]))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, 64, 64), generator=g,
                                      dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)


def ref_weight(w, s, h, l):
    """Double Rounding in numpy float64: q_l * s * 2**d and the STE mask."""
    d = h - l
    s = s.detach().double().view(-1, *[1] * (w.dim() - 1)).numpy()
    w = w.detach().double().numpy()
    q_h = np.clip(np.rint(w / s), -2**(h - 1), 2**(h - 1) - 1)
    q_l = np.clip(np.rint(q_h / 2**d), -2**(l - 1), 2**(l - 1) - 1)
    v = w / (s * 2**d)
    mask = (v >= -2**(l - 1)) & (v <= 2**(l - 1) - 1)
    return torch.from_numpy(q_l * s * 2**d), torch.from_numpy(mask)


def ref_act(x, layer, b):
    """Input fake quantization with the layer's own scale and sign."""
    aq = layer.act_quantizer
    s = aq.scale[aq.bits.index(b)].item()
    lo, hi = (-2**(b - 1), 2**(b - 1) - 1) if int(aq.signed) else (0, 2**b - 1)
    return torch.from_numpy(np.clip(np.rint(x.numpy() / s), lo, hi) * s)


def plain(model, x):
    return model(x)


def calibrate(model, shape, seed=0):
    """Initialise every bit's scales with a training-mode forward, then
    give the BNs random statistics (so folding matters) and go to eval."""
    from mmdrq.quantization import model_bits, set_bits
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bits = model_bits(model)
    for bit in bits:
        set_bits(model, bit)
        model(torch.randn(shape, generator=generator))
    set_bits(model, bits[0])  # where a loaded model starts
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.uniform_(-0.3, 0.3, generator=generator)
    return model.eval()


def folder_digest(folder):
    """One digest of a folder's file names and contents."""
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = osp.join(base, name)
            digest.update(osp.relpath(path, folder).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


def logged(log, key):
    """Every value logged for ``key`` (``key: value``), in order."""
    return [float(v) for v in re.findall(
        re.escape(key) + r': (-?[\d.]+(?:e[+-]?\d+)?|nan|-?inf)', log)]


def classifier_batch(count=4, size=16):
    """A batch for ``build_small_classifier``: random uint8 images, labels
    0, 1, 2, ..."""
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(1)
    return dict(
        inputs=[torch.randint(0, 256, (3, size, size), generator=g,
                              dtype=torch.uint8) for _ in range(count)],
        data_samples=[DataSample().set_gt_label(i % 10)
                      for i in range(count)])


class CountingWrapper(OptimWrapper):
    """OptimWrapper recording the model's bit at every step."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.step_bits = model, []

    def step(self, **kwargs):
        layer = self.model.architecture.backbone.layer1[0].conv1
        self.step_bits.append(layer.bit)
        super().step(**kwargs)


class RandomImages(Dataset):
    """Fresh random 32x32 images with labels, as mmpretrain packs them."""

    def __init__(self, size=8):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (size, 3, 32, 32),
                                    generator=generator, dtype=torch.uint8)
        self.labels = torch.randint(0, 10, (size, ), generator=generator)
        self.metainfo = dict(classes=[str(i) for i in range(10)])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from mmpretrain.structures import DataSample
        return dict(inputs=self.images[index],
                    data_samples=DataSample().set_gt_label(
                        self.labels[index]))


def build_iter_runner(tmp_path, model, hooks, max_iters=4, val_interval=1,
                      validate=True, val_cfg=None):
    """MMEngine's real Runner, iteration-based, around ``model`` (mmdrq's
    QAT wrapper of an mmpretrain classifier) on ``RandomImages``; ``val_cfg``
    (default: a plain ``MultiBitValLoop``) when ``validate``."""
    loader = dict(dataset=RandomImages(), batch_size=4, num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    validation = dict(
        val_dataloader=loader,
        val_cfg=val_cfg or dict(type='mmdrq.MultiBitValLoop'),
        val_evaluator=dict(type='mmpretrain.Accuracy')) if validate else {}
    from mmengine.runner import Runner
    return Runner(
        model=model, work_dir=str(tmp_path),
        experiment_name=f'iter_runner_{uuid.uuid4().hex}',
        train_dataloader=loader,
        train_cfg=dict(by_epoch=False, max_iters=max_iters,
                       val_interval=val_interval),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        custom_hooks=hooks, default_hooks=dict(checkpoint=None),
        default_scope='mmpretrain', **validation)
