"""Does every OpenMMLab model family still train and predict after mmdrq's
conversion? One config per family directory of mmpretrain, mmdet and mmseg
(the selection of benchmarks/conversion_survey.py: random init, no
download) is built, converted with ``quantize_model(model, bits=[8, 6, 4,
2])``, then, in train mode, at every bit: ``mode='loss'`` on a synthetic
batch of 2 images, the losses parsed as MMEngine does (``parse_losses``),
backward, and checks that the loss is finite and that gradients reached the
quantizers' learned scales (finite, not all zero); then, in eval mode at the
lowest bit, ``mode='predict'`` (outputs checked finite).

    python benchmarks/family_steps.py [--packages mmpretrain mmdet mmseg]
        [--families convnext paa ...] [--limit N] [--timeout S]
        [--max-params M] [--threads N] [--out benchmarks/results/family_steps]
        [--update]   (with --families: rerun those into the saved results)

The batch is built for the task and goes through the model's own data
preprocessor (from uint8 images): classification ``DataSample`` with
``gt_label``; detection ``DetDataSample`` with ``gt_instances`` (boxes,
labels and BitmapMasks), ``proposals`` (read by two-stage models without an
RPN), ``gt_sem_seg`` (read by panoptic and semantic-branch heads) and the
image metainfo; segmentation ``SegDataSample`` with ``gt_sem_seg`` and
``gt_edge_map`` (PIDNet); tracking models a two-frame ``TrackDataSample``
video, ReID a 256x128 crop with a label. Images are small first
(``--sizes``); where the float model cannot run that batch either, a larger
size is tried, and for mmpretrain the config's own train / test pipeline
(multi-view and masked-image-modeling inputs) on a synthetic image.

Every failure of the converted model is checked against the float model
(the same config built again with the same seed) on the same batch:

* the float model runs it: the failure implicates mmdrq (an error raised
  anywhere, a non-finite loss or output, no or non-finite scale gradient):
  listed as FAILED, and the script exits 1 (it gates a change);
* the float model fails too: the synthetic batch is at fault; the next
  batch is tried, and if none runs the family is listed as not exercised
  with the float model's error.

Families whose model has more than ``--max-params`` parameters (counted on
the meta device, before building) are skipped as too large for a CPU, and
each family runs under a ``--timeout`` (signal.alarm, as the survey's
``--forward-timeout``). Writes ``<out>.md`` and ``<out>.json`` after every
family (a killed run keeps what it did).
"""
import argparse
import copy
import functools
import gc
import json
import math
import os
import os.path as osp
import random
import resource
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch
from torch import nn

import mmdrq
from mmdrq.quantization import LearnedScaleQuantizer, QuantLayer, set_bits
from mmdrq.utils import atomic_write, atomic_write_json
# benchmarks/ is on sys.path when this file runs as a script
from conversion_survey import (SCOPES, _out_of_time, add_family_args,
                               family_configs, strip_pretrained)

HERE = osp.dirname(osp.abspath(__file__))
BITS = (8, 6, 4, 2)
MMDRQ_DIR = osp.dirname(osp.abspath(mmdrq.__file__)) + os.sep
# first sizes tried per package (square images); a family whose float
# model cannot run the first runs the next
SIZES = dict(mmpretrain=[64], mmdet=[128, 320], mmseg=[64, 256])
N_IMAGES = 2


# ------------------------------------------------------------- build

def load_model_cfg(package, path):
    """(cfg, model cfg) as the Runner builds it (a top-level
    data_preprocessor goes into the model), every pretrained file dropped;
    detection batch augments (they resize or pad the batch to the
    training size: YOLOX's 480-800 px, LSJ's 1024 px) removed."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    model_cfg = copy.deepcopy(cfg.model)  # ConfigDict: mmdet reads attrs
    if cfg.get('data_preprocessor') is not None and \
            'data_preprocessor' not in model_cfg:
        model_cfg['data_preprocessor'] = copy.deepcopy(cfg.data_preprocessor)
    strip_pretrained(model_cfg)
    if package == 'mmdet':
        for holder in _preprocessor_cfgs(model_cfg):
            holder.pop('batch_augments', None)
        _offline_teacher(package, model_cfg)
    return cfg, model_cfg


def _offline_teacher(package, model_cfg):
    """Knowledge-distillation detectors (LD, LAD): no teacher checkpoint
    (a download), and LD's teacher config, a path relative to the mmdet
    repository, read from the installed package's configs, pretrained
    files dropped."""
    import importlib
    from mmengine.config import Config
    if 'teacher_ckpt' in model_cfg:
        model_cfg['teacher_ckpt'] = None
    teacher = model_cfg.get('teacher_config')
    if isinstance(teacher, str):
        if not osp.exists(teacher):
            teacher = osp.join(osp.dirname(importlib.import_module(
                package).__file__), '.mim', teacher)
        teacher_model = copy.deepcopy(Config.fromfile(teacher).model)
        strip_pretrained(teacher_model)
        model_cfg['teacher_config'] = dict(model=teacher_model)


def _preprocessor_cfgs(cfg):
    """Every data_preprocessor dict in a model cfg (trackers nest one in
    their detector)."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == 'data_preprocessor' and isinstance(value, dict):
                yield value
            yield from _preprocessor_cfgs(value)
    elif isinstance(cfg, list):
        for item in cfg:
            yield from _preprocessor_cfgs(item)


def build(package, model_cfg, device=None):
    """The model of ``model_cfg``, seeded: the float reference built again
    later has the same weights."""
    import importlib
    from mmengine.registry import init_default_scope
    init_default_scope(SCOPES[package])
    registry = importlib.import_module(f'{package}.registry').MODELS
    torch.manual_seed(0)
    np.random.seed(0)
    if device is None:
        model = registry.build(copy.deepcopy(model_cfg))
        # as the Runner does: the modules' own inits (SSD's L2Norm scale,
        # Sparse R-CNN's initial proposal boxes) instead of garbage
        model.family_steps_init_error = None
        upstream_fixes(model, before_init=True)
        if hasattr(model, 'init_weights'):
            try:
                model.init_weights()
            except Exception as e:  # SAN: super() has no init_weights
                model.family_steps_init_error = \
                    f'init_weights failed ({type(e).__name__}: {e}); ' \
                    'PyTorch default init'
                # what init_weights removes when it ends: every module's
                # map of all parameters (a deepcopy of any module, as
                # mmdrq's per-bit norms make, would copy the whole model)
                for module in model.modules():
                    module.__dict__.pop('_params_init_info', None)
        upstream_fixes(model)
        return model
    with torch.device(device):
        return registry.build(copy.deepcopy(model_cfg))


def _init_sos_token(module, rec_state_dict=None):
    from mmengine.model import normal_init
    if hasattr(module, 'sos_token'):
        normal_init(module.sos_token, std=0.02)


def upstream_fixes(model, before_init=False):
    """Work around upstream bugs that stop a float model's step too (so
    that the family is exercised at all); each says which."""
    for m in model.modules():
        if before_init:
            # mmseg 1.2: SAN's RecWithAttnbias.init_weights without a
            # pretrained state calls nn.Module's (absent) init_weights
            if type(m).__name__ == 'RecWithAttnbias':
                m.init_weights = functools.partial(_init_sos_token, m)
            continue
        # mmdet 3.3: SSDHead skips AnchorHead.__init__, so it has no
        # loss_cls, which BaseDenseHead._predict_by_feat_single reads
        if type(m).__name__ == 'SSDHead' and 'loss_cls' not in dir(m):
            m.loss_cls = None


def meta_params(package, model_cfg):
    """Parameter count of the model built on the meta device (no memory,
    no init), or None where the build needs real tensors."""
    try:
        model = build(package, model_cfg, 'meta')
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------- batches

def _rng(size, salt=0):
    return np.random.default_rng(1000 * size + salt)


def _images(rng, n, channels, h, w):
    return [torch.from_numpy(rng.integers(0, 256, (channels, h, w),
                                          dtype=np.uint8)) for _ in range(n)]


def _channels(model):
    """Image channels: the data preprocessor's mean (LeNet's is 1), else
    1 where the first conv reads one channel, else 3 (YOLOX's first conv
    reads 12: it follows a space-to-depth)."""
    mean = getattr(model.data_preprocessor, 'mean', None)
    if isinstance(mean, torch.Tensor) and mean.numel() >= 1:
        return mean.numel()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return 1 if m.in_channels == 1 else 3
    return 3


def _int_attrs(model, name):
    found = []
    for m in model.modules():
        value = m.__dict__.get(name)
        if isinstance(value, int) and not isinstance(value, bool) \
                and value >= 1:
            found.append(value)
    return found


def _blocky(rng, h, w, values, cell=8):
    """An (h, w) label map of constant cells (not per-pixel noise)."""
    gh, gw = max(1, h // cell), max(1, w // cell)
    grid = rng.integers(0, values, (gh, gw))
    full = np.kron(grid, np.ones((cell, cell), dtype=grid.dtype))
    out = np.zeros((h, w), dtype=np.int64)
    out[:min(h, full.shape[0]), :min(w, full.shape[1])] = \
        full[:h, :w]
    return out


def _boxes(rng, h, w, k=3):
    """k boxes of 20% to 70% of the image, inside it."""
    out = []
    for _ in range(k):
        bw, bh = rng.uniform(0.2, 0.7) * w, rng.uniform(0.2, 0.7) * h
        x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append([x1, y1, x1 + bw, y1 + bh])
    return np.array(out, dtype=np.float32)


def cls_batch(model, size, salt=0):
    from mmpretrain.structures import DataSample
    rng = _rng(size, salt)
    head = getattr(model, 'head', None)
    classes = getattr(head, 'num_classes', None) or getattr(
        model.data_preprocessor, 'num_classes', None) or 10
    samples = [DataSample().set_gt_label(int(rng.integers(0, classes)))
               for _ in range(N_IMAGES)]
    return dict(inputs=_images(rng, N_IMAGES, _channels(model), size, size),
                data_samples=samples)


def det_sample(rng, model, h, w, i, track=False):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData, PixelData
    classes = min(_int_attrs(model, 'num_classes') or [1])
    sample = DetDataSample(metainfo=dict(
        img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
        batch_input_shape=(h, w), scale_factor=(1.0, 1.0), img_id=i,
        img_path=f'synthetic_{i}.png', flip=False, flip_direction=None,
        frame_id=i, video_length=N_IMAGES))
    boxes = _boxes(rng, h, w)
    masks = np.zeros((len(boxes), h, w), dtype=np.uint8)
    for j, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        masks[j, y1:y2 + 1, x1:x2 + 1] = 1
    gt = InstanceData(bboxes=torch.from_numpy(boxes),
                      labels=torch.from_numpy(
                          rng.integers(0, classes, len(boxes))),
                      masks=BitmapMasks(masks, h, w))
    if track:
        gt.instances_ids = torch.arange(len(boxes))
    sample.gt_instances = gt
    sample.ignored_instances = InstanceData(
        bboxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))
    if getattr(model, 'with_rpn', True) is False:
        # two-stage without an RPN (Fast R-CNN) reads them; with an RPN,
        # predict would read them instead of running it
        proposals = _boxes(rng, h, w, 20)
        sample.proposals = InstanceData(
            bboxes=torch.from_numpy(proposals),
            scores=torch.from_numpy(rng.uniform(0.1, 1.0, 20).astype(
                np.float32)))
    # panoptic heads: things and stuff ids; semantic branches: their classes
    things = _int_attrs(model, 'num_things_classes')
    stuff = _int_attrs(model, 'num_stuff_classes')
    values = things[0] + stuff[0] if things and stuff else \
        min(_int_attrs(model, 'num_classes') or [1])
    sample.gt_sem_seg = PixelData(sem_seg=torch.from_numpy(
        _blocky(rng, h, w, values))[None])
    return sample


def det_batch(model, size, salt=0):
    rng = _rng(size, salt)
    return dict(inputs=_images(rng, N_IMAGES, _channels(model), size, size),
                data_samples=[det_sample(rng, model, size, size, i)
                              for i in range(N_IMAGES)])


def semi_batch(model, size, salt=0):
    """Semi-supervised detectors (SoftTeacher): the same images in the
    supervised, teacher and student branches, an identity homography."""
    base = det_batch(model, size, salt)
    for sample in base['data_samples']:
        sample.set_metainfo(dict(homography_matrix=np.eye(
            3, dtype=np.float32)))
    branches = ('sup', 'unsup_teacher', 'unsup_student')
    return dict(inputs={b: [t.clone() for t in base['inputs']]
                        for b in branches},
                data_samples={b: copy.deepcopy(base['data_samples'])
                              for b in branches})


def track_batch(model, size, salt=0, videos=N_IMAGES):
    """Videos of two frames (key and reference frame: QDTrack,
    MaskTrackRCNN; Mask2FormerVideo's clip); their predict takes one."""
    from mmdet.structures import TrackDataSample
    rng = _rng(size, salt)
    channels = _channels(model)
    inputs, samples = [], []
    for v in range(videos):
        frames = [det_sample(rng, model, size, size, f, track=True)
                  for f in range(2)]
        sample = TrackDataSample(video_data_samples=frames,
                                 metainfo=dict(key_frames_inds=[0],
                                               ref_frames_inds=[1]))
        inputs.append(torch.stack(_images(rng, 2, channels, size, size)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def reid_batch(model, size, salt=0):
    """ReID crops are 256x128 (its head's flatten is sized for them)."""
    from mmdet.structures import ReIDDataSample as ReIDSample
    rng = _rng(size, salt)
    classes = min(_int_attrs(model, 'num_classes') or [2])
    samples = [ReIDSample().set_gt_label(int(rng.integers(0, classes)))
               for _ in range(N_IMAGES)]
    return dict(inputs=_images(rng, N_IMAGES, _channels(model), 256, 128),
                data_samples=samples)


def seg_batch(model, size, salt=0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    rng = _rng(size, salt)
    classes = getattr(model, 'num_classes', None) or 2
    samples = []
    for i in range(N_IMAGES):
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            pad_shape=(size, size), scale_factor=(1.0, 1.0), flip=False,
            flip_direction=None, img_path=f'synthetic_{i}.png',
            reduce_zero_label=False))
        # no ignored (255) pixels: mmseg 1.2's cross_entropy with a
        # class_weight (PIDNet) indexes the weight with every label
        labels = _blocky(rng, size, size, classes)
        sample.gt_sem_seg = PixelData(data=torch.from_numpy(labels)[None])
        edges = np.zeros_like(labels)
        edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        edges[1:, :] |= labels[1:, :] != labels[:-1, :]
        sample.gt_edge_map = PixelData(data=torch.from_numpy(edges)[None])
        samples.append(sample)
    # pads the training batch to this size (the config's is the crop size)
    if hasattr(model.data_preprocessor, 'size'):
        model.data_preprocessor.size = (size, size)
        model.data_preprocessor.size_divisor = None  # one of the two
    return dict(inputs=_images(rng, N_IMAGES, _channels(model), size, size),
                data_samples=samples)


def _find_pipeline(cfg, split):
    def walk(dataset):
        if not isinstance(dataset, dict):
            return None
        if dataset.get('pipeline') is not None:
            return dataset['pipeline']
        for key in ('dataset', 'datasets'):
            inner = dataset.get(key)
            for item in inner if isinstance(inner, list) else [inner]:
                found = walk(item)
                if found is not None:
                    return found
        return None
    loader = cfg.get(f'{split}_dataloader') or {}
    return walk(loader.get('dataset')) or cfg.get(f'{split}_pipeline')


def _no_hue(transforms):
    """ColorJitter's hue to 0, also nested (RandomApply, MultiView): mmcv
    2.1's adjust_hue adds a negative Python int to a uint8 array, an
    OverflowError under numpy 2."""
    if isinstance(transforms, dict):
        if transforms.get('type') == 'ColorJitter' and transforms.get('hue'):
            transforms['hue'] = 0.0
        for value in transforms.values():
            _no_hue(value)
    elif isinstance(transforms, list):
        for item in transforms:
            _no_hue(item)


def pipeline_batch(cfg, model, split, salt=0):
    """The config's own ``split`` pipeline (file loading dropped) on a
    synthetic 256x256 image, collated as its dataloader does."""
    from mmengine.dataset import Compose, default_collate, pseudo_collate
    # headless configs have a test pipeline only
    pipeline = _find_pipeline(cfg, split) or _find_pipeline(
        cfg, 'test' if split == 'train' else 'train')
    if pipeline is None:
        raise ValueError(f'config has no {split} pipeline')
    steps = [copy.deepcopy(t) for t in pipeline
             if not str(t.get('type', '')).startswith('LoadImageFrom')]
    _no_hue(steps)
    compose = Compose(steps)
    rng = _rng(256, salt)
    channels = _channels(model)
    classes = getattr(getattr(model, 'head', None), 'num_classes', None) \
        or 10
    results = []
    for i in range(N_IMAGES):
        img = rng.integers(0, 256, (256, 256, channels), dtype=np.uint8)
        if channels == 1:
            img = img[..., 0]
        results.append(compose(dict(
            img=img, img_shape=(256, 256), ori_shape=(256, 256),
            gt_label=int(rng.integers(0, classes)), sample_idx=i,
            img_path=f'synthetic_{i}.png')))
    loader = cfg.get(f'{split}_dataloader') or {}
    collate = (loader.get('collate_fn') or {}).get('type', 'pseudo_collate')
    return (default_collate if 'default' in str(collate)
            else pseudo_collate)(results)


def _native_size(cfg):
    """The square training crop of an mmseg config (its longer side), or
    None."""
    size = cfg.get('crop_size') or (cfg.model.get('data_preprocessor')
                                    or {}).get('size')
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and size:
        return max(size)
    return None


def model_kind(package, model):
    name = type(model).__name__
    if package == 'mmdet':
        if name in ('BaseReID', 'ReID') or 'ReID' in name:
            return 'reid'
        from mmdet.models.detectors import SemiBaseDetector
        from mmdet.models.mot import BaseMOTModel
        if isinstance(model, SemiBaseDetector):
            return 'semi'
        if isinstance(model, BaseMOTModel) or name.endswith('VideoFormer') \
                or 'Video' in name:
            return 'track'
        return 'det'
    if package == 'mmseg':
        return 'seg'
    from mmpretrain.models import BaseSelfSupervisor
    if isinstance(model, BaseSelfSupervisor):
        return 'selfsup'
    if hasattr(model, 'with_head') and not model.with_head:
        return 'headless'
    return 'cls'


def candidates(package, kind, cfg):
    """(label, train batch maker, predict batch maker) to try in order;
    makers take the model (the float reference gets its own batch, built
    the same)."""
    if kind == 'reid':
        return [('256x128', lambda m: reid_batch(m, 0),
                 lambda m: reid_batch(m, 0, 1))]
    out = []
    maker = dict(det=det_batch, semi=semi_batch, track=track_batch,
                 seg=seg_batch).get(kind, cls_batch)
    sizes = list(SIZES[package])
    native = _native_size(cfg) if package == 'mmseg' else None
    if native and native not in sizes:  # BEiT's fixed relative positions
        sizes.append(native)
    for size in sizes:
        if kind == 'track':
            predict = lambda m, s=size: track_batch(m, s, 1, videos=1)  # noqa: E731,E501
        elif kind == 'semi':  # predict takes one plain batch
            predict = lambda m, s=size: det_batch(m, s, 1)  # noqa: E731
        else:
            predict = lambda m, s=size: maker(m, s, 1)  # noqa: E731
        out.append((f'{size}x{size}', lambda m, s=size: maker(m, s),
                    predict))
    if package == 'mmpretrain':
        out.append(('config pipeline',
                    lambda m: pipeline_batch(cfg, m, 'train'),
                    lambda m: pipeline_batch(cfg, m, 'test', 1)
                    if kind == 'cls' else pipeline_batch(cfg, m, 'train',
                                                         1)))
        size = _backbone_img_size(cfg)
        if size and size not in sizes:  # a config without any pipeline
            out.append((f'{size}x{size} (backbone img_size)',
                        lambda m, s=size: maker(m, s),
                        lambda m, s=size: maker(m, s, 1)))
    return out


def _backbone_img_size(cfg):
    size = (cfg.model.get('backbone') or {}).get('img_size')
    if isinstance(size, (list, tuple)) and size:
        size = max(size)
    return size if isinstance(size, int) else None


# ------------------------------------------------------------- steps

class StepFailure(Exception):
    """A step ran but its result is wrong (non-finite, no gradient)."""


def _tensors(obj, depth=0):
    """Every floating tensor in a model output (data elements, dicts,
    lists), to check outputs are finite."""
    from mmengine.structures import BaseDataElement
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, BaseDataElement):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


def _parse_losses(model, losses):
    if hasattr(model, 'parse_losses'):
        return model.parse_losses(losses)[0]
    return sum(v.mean() if isinstance(v, torch.Tensor) else sum(
        x.mean() for x in v) for k, v in losses.items() if 'loss' in k)


def _surrogate(output):
    """Headless models (features only): the mean square of every output
    tensor, so backward runs through the network."""
    tensors = list(_tensors(output))
    if not tensors:
        raise ValueError('the tensor forward returned no tensor')
    return sum(t.float().square().mean() for t in tensors)


def _nonzero(grad):
    return grad is not None and bool((grad != 0).any())


def _scale_grads(model, bit):
    """Per quantized layer whose weight got a gradient in this step
    (``live``; a zero-initialised residual branch or head passes none):
    how many of them got one on their weight scale and on their input's
    scale at ``bit``, and how many quantizers have a non-finite scale
    gradient."""
    live = weight = act = bad = 0
    for m in model.modules():
        if isinstance(m, LearnedScaleQuantizer) and m.scale.grad is not None \
                and not torch.isfinite(m.scale.grad).all():
            bad += 1
        if not isinstance(m, QuantLayer) or not _nonzero(m.float_weight.grad):
            continue
        live += 1
        weight += _nonzero(m.weight_quantizer.scale.grad)
        if m.act_quantizer is None:
            continue
        rows = [q for q in m.act_quantizer.modules()
                if isinstance(q, LearnedScaleQuantizer)]
        act += any(
            _nonzero(q.scale.grad[q.bits.index(bit)]
                     if q.scale.grad is not None and
                     q.scale.shape[0] == len(q.bits) else q.scale.grad)
            for q in rows)
    layers = sum(isinstance(m, QuantLayer) for m in model.modules())
    return live, layers, weight, act, bad


def _weights_live(model):
    """Conv / linear weights of the float model that got a gradient."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) and
               _nonzero(m.weight.grad) for m in model.modules())


def _sgd(model, lr=0.1):
    """One plain SGD update: a zero-initialised head (DeiT's) passes no
    gradient to the layers before it until it has been trained once."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _seed(seed=1):
    """The same random transforms, batch augments (mixup, masks) and
    sampling for the converted model and its float reference."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _loss_backward(model, kind, make, bit):
    model.train()
    if bit is not None:
        set_bits(model, bit)
    model.zero_grad(set_to_none=True)
    _seed()
    raw = make(model)
    data = model.data_preprocessor(raw, training=True)
    if kind == 'headless':
        loss = _surrogate(model(data['inputs'], mode='tensor'))
    else:
        loss = _parse_losses(model, model(**data, mode='loss'))
    value = float(loss.detach())
    if not math.isfinite(value):
        raise StepFailure(f'non-finite loss {value}')
    loss.backward()
    return value


def loss_step(model, kind, make, bit=None):
    """One training step's forward, loss parse and backward at ``bit``
    (None: the float reference): the loss, and the scale gradient counts.
    Where the step's gradient reaches no quantized (conv / linear) weight
    or no scale, one SGD update and the step again."""
    value = _loss_backward(model, kind, make, bit)
    if bit is None:
        for name, p in model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise StepFailure(f'non-finite gradient of {name}')
        if not _weights_live(model):
            _sgd(model)
            value = _loss_backward(model, kind, make, bit)
            if not _weights_live(model):
                raise StepFailure('no conv / linear weight got a gradient, '
                                  'also after one SGD update')
        return value, None
    live, layers, weight, act, bad = _scale_grads(model, bit)
    again = False
    if not live or weight + act == 0:
        # DeiT's zero-initialised head_dist: its weight gets a gradient,
        # nothing before it does, and its scales see an all-zero weight
        _sgd(model)
        value = _loss_backward(model, kind, make, bit)
        live, layers, weight, act, bad = _scale_grads(model, bit)
        again = True
    if bad:
        raise StepFailure(f'non-finite scale gradient in {bad} quantizers')
    if not live:
        raise StepFailure(f'no weight of the {layers} quantized layers got a '
                          'gradient, also after one SGD update')
    if weight + act == 0:
        raise StepFailure(f'no quantizer scale got a gradient, though the '
                          f'weights of {live} of {layers} quantized layers '
                          'did')
    return value, dict(live=f'{live}/{layers}', weight=f'{weight}/{live}',
                       act=f'{act}/{live}', second_step=again)


def predict_step(model, kind, make, bit=None):
    """Eval-mode predict at ``bit`` (self-supervised and headless models
    have no predict mode: their tensor forward); every output finite."""
    model.eval()
    if bit is not None:
        set_bits(model, bit)
    _seed()
    raw = make(model)
    with torch.no_grad():
        data = model.data_preprocessor(raw, training=False)
        if hasattr(model, 'prepare_prototype') and not isinstance(
                model.prototype, torch.Tensor):
            # a retriever's gallery (ArcFace: a dataset's files): random
            # vectors of its feature size
            feats = model.extract_feat(data['inputs'])
            feats = feats[-1] if isinstance(feats, tuple) else feats
            model.prototype = torch.randn(8, feats.shape[-1])
            model.prototype_inited = False
        if kind in ('selfsup', 'headless'):
            inputs = data['inputs']
            if isinstance(inputs, (list, tuple)):  # views: the first
                inputs = inputs[0]
            out = model(inputs, mode='tensor')
        else:
            out = model(**data, mode='predict')
    tensors = list(_tensors(out))
    bad = sum(not torch.isfinite(t).all() for t in tensors)
    if bad:
        raise StepFailure(f'{bad} of {len(tensors)} output tensors '
                          'non-finite')
    return f'{len(tensors)} output tensors finite'


def _short(path):
    path = osp.abspath(path)
    if path.startswith(MMDRQ_DIR):
        return 'mmdrq/' + path[len(MMDRQ_DIR):]
    for marker in ('site-packages' + os.sep, HERE + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def describe(e):
    """The error's class and first message line, where it was raised, the
    deepest frame inside mmdrq (or None), and the traceback tail."""
    if isinstance(e, StepFailure):
        return dict(error=str(e), kind='result', raised_at=None,
                    mmdrq_frame=None, tail='')
    frames = traceback.extract_tb(e.__traceback__)
    first = (str(e).strip().splitlines() or [''])[0][:200]
    ours = [f for f in frames if osp.abspath(f.filename).startswith(
        MMDRQ_DIR)]
    # the last frames, without torch's Module.__call__ wrappers
    kept = traceback.StackSummary.from_list(
        [f for f in frames if not f.filename.endswith(
            osp.join('torch', 'nn', 'modules', 'module.py'))][-8:])
    tail = ''.join(kept.format()) + ''.join(
        traceback.format_exception_only(type(e), e))
    return dict(
        error=f'{type(e).__name__}: {first}', kind='error',
        raised_at=(f'{_short(frames[-1].filename)}:{frames[-1].lineno}'
                   if frames else None),
        mmdrq_frame=(f'{_short(ours[-1].filename)}:{ours[-1].lineno} '
                     f'({ours[-1].name})' if ours else None),
        tail=tail[-3000:])


def attempt(fn):
    """``fn()``'s result, or the description of its exception."""
    try:
        return True, fn()
    except TimeoutError:
        raise
    except Exception as e:  # noqa: B902 a survey: report, go on
        return False, describe(e)


# ------------------------------------------------------------- a family

class Family:

    def __init__(self, package, family, path, args):
        self.package, self.family, self.path = package, family, path
        self.args = args
        self.rec = dict(package=package, family=family,
                        config=osp.basename(path), status='not built',
                        params_m=None, built=False, converted=False,
                        batch=None, bits={}, predict=None, seconds=None,
                        not_exercised=None, stage='config')
        self._fp = None

    def fp(self):
        """The float reference (same config, same seed), built once."""
        if self._fp is None:
            self.rec['stage'] = 'float reference build'
            self._fp = build(self.package, self.model_cfg)
            self.rec['float_reference_built'] = True
        return self._fp

    def run(self):
        rec = self.rec
        start = time.time()
        handler = signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(self.args.timeout)
        try:
            self._run()
        except TimeoutError:
            rec['status'] = 'timeout'
            rec['timeout'] = f'over {self.args.timeout} s in {rec["stage"]}'
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, handler)
            rec['seconds'] = round(time.time() - start, 1)
            if rec['status'] != 'timeout':
                rec.pop('stage', None)
        return rec

    def _run(self):
        rec = self.rec
        ok, got = attempt(lambda: load_model_cfg(self.package, self.path))
        if not ok:
            rec['build_error'] = got['error']
            return
        self.cfg, self.model_cfg = got
        rec['stage'] = 'parameter count'
        params = meta_params(self.package, self.model_cfg)
        if params is not None:
            rec['params_m'] = round(params / 1e6, 1)
            if params > self.args.max_params * 1e6:
                rec['status'] = 'skipped: too large'
                return
        rec['stage'] = 'build'
        ok, model = attempt(lambda: build(self.package, self.model_cfg))
        if not ok:
            rec['build_error'] = model['error']
            return
        rec['built'] = True
        if model.family_steps_init_error:
            rec['note'] = model.family_steps_init_error
        if params is None:
            params = sum(p.numel() for p in model.parameters())
            rec['params_m'] = round(params / 1e6, 1)
            if params > self.args.max_params * 1e6:
                rec['status'] = 'skipped: too large'
                return
        rec['stage'] = 'convert'
        ok, got = attempt(lambda: mmdrq.quantize_model(model, bits=BITS))
        if not ok:
            rec['status'] = 'FAILED'
            rec['convert_error'] = got
            rec['failures'] = [dict(step='convert', **got)]
            return
        rec['converted'] = True
        kind = rec['kind'] = model_kind(self.package, model)
        self.train_bits(model, kind)
        self.predict(model, kind)
        failures = rec.setdefault('failures', [])
        for bit, cell in rec['bits'].items():
            if not cell['ok']:
                failures.append(dict(step=f'loss+backward at {bit} bits',
                                     **cell['failure']))
        if rec['predict'] and not rec['predict']['ok']:
            failures.append(dict(step=f'predict at {BITS[-1]} bits',
                                 **rec['predict']['failure']))
        if failures:
            rec['status'] = 'FAILED'
        elif not rec['bits']:
            rec['status'] = 'not exercised'
        elif rec['predict'] is None:
            rec['status'] = 'ok, predict not exercised'
        else:
            rec['status'] = 'ok'

    def _fp_check(self, step, kind, make):
        """Whether the float model runs the batch: (True, None) or
        (False, its failure)."""
        fp = self.fp()
        self.rec['stage'] = 'float reference step'
        ok, got = attempt(lambda: step(fp, kind, make))
        return ok, (None if ok else got)

    def train_bits(self, model, kind):
        rec = self.rec
        reasons = []
        for label, make, make_predict in candidates(self.package, kind,
                                                    self.cfg):
            cells = {}
            for bit in BITS:
                rec['stage'] = f'loss+backward at {bit} bits ({label})'
                start = time.time()
                ok, got = attempt(lambda: loss_step(model, kind, make, bit))
                cells[bit] = dict(ok=ok, seconds=round(time.time() - start,
                                                       1))
                if ok:
                    cells[bit].update(loss=round(got[0], 4),
                                      scale_grads=got[1])
                else:
                    cells[bit]['failure'] = got
            self._batch = (label, make_predict)
            if all(c['ok'] for c in cells.values()):
                rec['batch'], rec['bits'] = label, cells
                return
            fp_ok, fp_failure = self._fp_check(loss_step, kind, make)
            if fp_ok:  # the float model runs it: mmdrq is implicated
                for cell in cells.values():
                    if not cell['ok']:
                        cell['failure']['float_model'] = 'runs this batch'
                rec['batch'], rec['bits'] = label, cells
                return
            first = next(c['failure'] for c in cells.values()
                         if not c['ok'])
            reasons.append(f'{label}: float model fails too: '
                           f'{fp_failure["error"]} (quantized: '
                           f'{first["error"]})')
        rec['not_exercised'] = reasons
        self._batch = None

    def predict(self, model, kind):
        rec = self.rec
        # the batch training ran on first, then the others
        order = candidates(self.package, kind, self.cfg)
        if self._batch is not None:
            order.sort(key=lambda c: c[0] != self._batch[0])
        reasons = []
        for label, _, make in order:
            rec['stage'] = f'predict at {BITS[-1]} bits ({label})'
            start = time.time()
            ok, got = attempt(lambda: predict_step(model, kind, make,
                                                   BITS[-1]))
            seconds = round(time.time() - start, 1)
            if ok:
                rec['predict'] = dict(ok=True, batch=label, result=got,
                                      seconds=seconds,
                                      mode='predict' if kind not in (
                                          'selfsup', 'headless')
                                      else 'tensor (no predict mode)')
                return
            fp_ok, fp_failure = self._fp_check(predict_step, kind, make)
            if fp_ok:
                got['float_model'] = 'runs this batch'
                rec['predict'] = dict(ok=False, batch=label, failure=got,
                                      seconds=seconds)
                return
            reasons.append(f'{label}: float model fails too: '
                           f'{fp_failure["error"]} (quantized: '
                           f'{got["error"]})')
        rec['predict'] = None
        rec['predict_not_exercised'] = reasons
        rec['not_exercised'] = (rec['not_exercised'] or []) + [
            'predict: ' + r for r in reasons]


# ------------------------------------------------------------- report

def _cell(rec, bit):
    cell = rec['bits'].get(bit)
    if cell is None:
        return ''
    if cell['ok']:
        return f'ok ({cell["seconds"]} s)'
    return 'FAIL'


def _predict_cell(rec):
    p = rec.get('predict')
    if p is None:
        return 'not run' if rec['converted'] else ''
    if p['ok']:
        return 'ok' + (' (tensor)' if p['mode'].startswith('tensor') else '')
    return 'FAIL'


def _md_escape(text):
    return str(text).replace('|', '\\|').replace('\n', ' ')


def summary(records):
    def names(rs):
        return [f'{r["package"]}/{r["family"]}' for r in rs]
    built = [r for r in records if r['built']]
    return dict(
        families=len(records), built=len(built),
        all_bits_ok=len([r for r in built if r['bits'] and
                         all(c['ok'] for c in r['bits'].values())]),
        predict_ok=len([r for r in built if r['predict'] and
                        r['predict']['ok']]),
        ok=len([r for r in records if r['status'] == 'ok']),
        failed=names(r for r in records if r['status'] == 'FAILED'),
        not_exercised=names(r for r in records
                            if r['status'] == 'not exercised'),
        predict_not_exercised=names(
            r for r in records if r['built'] and r['converted'] and
            r['predict'] is None and r['status'] != 'timeout'),
        not_built=names(r for r in records if r['status'] == 'not built'),
        skipped_too_large=[f'{r["package"]}/{r["family"]} '
                           f'({r["params_m"]} M params)' for r in records
                           if r['status'].startswith('skipped')],
        timeout=names(r for r in records if r['status'] == 'timeout'))


def _listed(key, s):
    items = s[key]
    return f'{len(items)}' + (f' ({", ".join(items)})' if items else '')


def summary_line(s):
    return (f'{s["families"]} families run: {s["built"]} built, '
            f'{s["all_bits_ok"]} loss+backward ok at every bit, '
            f'{s["predict_ok"]} predict ok, {s["ok"]} all ok; '
            f'FAILED {_listed("failed", s)}; '
            f'not exercised {_listed("not_exercised", s)}; '
            f'predict not exercised {_listed("predict_not_exercised", s)}; '
            f'not built {len(s["not_built"])}; '
            f'skipped too large {_listed("skipped_too_large", s)}; '
            f'timeout {_listed("timeout", s)}')


def write_results(records, args, wall, out):
    s = summary(records)
    content = dict(command=args.command, bits=list(BITS),
                   torch=torch.__version__, threads=args.threads,
                   timeout_s=args.timeout, max_params_m=args.max_params,
                   wall_s=round(wall, 1), summary=s,
                   summary_line=summary_line(s), families=records)
    atomic_write_json(out + '.json', content)
    lines = [
        '# Loss + backward at every bit, predict at the lowest, one config '
        'per family', '',
        f'`{args.command}` (torch {torch.__version__}, CPU, '
        f'{args.threads} threads, wall {wall / 60:.1f} min; '
        f'bits {list(BITS)}, {N_IMAGES} synthetic images per batch).', '',
        f'**{summary_line(s)}**', '',
        'A failure is FAILED only where the float model (same config, same '
        'seed) runs the same batch: mmdrq is implicated. Where the float '
        'model fails too the batch is at fault (not exercised). Cells: '
        'seconds of the loss+backward step; predict "(tensor)": a model '
        'with no predict mode ran its tensor forward.', '',
        '| package | family | config | params (M) | status | batch | '
        + ' | '.join(f'{b} bit' for b in BITS) + f' | predict @{BITS[-1]} '
        '| 2-bit step: layers with weight grad; of them, with weight-scale, input-scale grad | s | note |',
        '|---|---|---|---|---|---|' + '---|' * len(BITS) + '---|---|---|---|']
    for r in records:
        note = ''
        if r['status'] == 'not built':
            note = r.get('build_error', '')
        elif r['status'] == 'timeout':
            note = r.get('timeout', '')
        elif r.get('failures'):
            f = r['failures'][0]
            note = f'{f["step"]}: {f["error"]}' + (
                f' [mmdrq frame {f["mmdrq_frame"]}]'
                if f.get('mmdrq_frame') else '')
        elif r['not_exercised']:
            note = r['not_exercised'][0]
        if r.get('note'):
            note = f'{r["note"]}; {note}' if note else r['note']
        grads = (r['bits'].get(BITS[-1]) or {}).get('scale_grads') or {}
        lines.append('| ' + ' | '.join(_md_escape(x) for x in [
            r['package'], r['family'], r['config'],
            '' if r['params_m'] is None else r['params_m'], r['status'],
            r['batch'] or ''] + [_cell(r, b) for b in BITS] + [
            _predict_cell(r),
            f'{grads["live"]}; {grads["weight"]}, {grads["act"]}'
            + (' (2nd step)' if grads.get('second_step') else '')
            if grads else '', r['seconds'], note[:300]]) + ' |')
    failed = [r for r in records if r.get('failures')]
    if failed:
        lines += ['', '## Failures (mmdrq implicated)', '']
        for r in failed:
            groups = {}  # the same error at several steps: listed once
            for f in r['failures']:
                key = (f['error'], f.get('raised_at'))
                groups.setdefault(key, (f, []))[1].append(f['step'])
            for f, steps in groups.values():
                lines += [f'### {r["package"]}/{r["family"]}: '
                          + ', '.join(steps), '',
                          f'- error: `{f["error"]}`',
                          f'- raised at: `{f.get("raised_at")}`',
                          f'- deepest mmdrq frame: `{f.get("mmdrq_frame")}`',
                          f'- float model: {f.get("float_model", "")}', '']
                if f.get('tail'):
                    lines += ['```', f['tail'].rstrip(), '```', '']
    not_ex = [r for r in records if r['not_exercised']]
    if not_ex:
        lines += ['', '## Not exercised (the synthetic batch, not mmdrq)',
                  '']
        for r in not_ex:
            for reason in r['not_exercised']:
                lines.append(f'- {r["package"]}/{r["family"]}: '
                             f'{_md_escape(reason)}')
    atomic_write(out + '.md', lambda f: f.write(
        ('\n'.join(lines) + '\n').encode()))
    return s


def _physical_gib():
    with open('/proc/meminfo') as f:
        for line in f:
            if line.startswith('MemTotal:'):
                return int(line.split()[1]) / 2**20
    return 64.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_family_args(parser)
    parser.add_argument('--timeout', type=int, default=900,
                        help='seconds for one family (build, every step, '
                        'the float reference)')
    parser.add_argument('--max-params', type=float, default=400,
                        help='skip models with more parameters (millions)')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--max-memory', type=float, default=None,
                        help='GiB of address space (RLIMIT_AS) for this '
                        'process, so a model too large for the machine '
                        'fails with an error instead of the OOM killer '
                        'ending the run (default: the physical memory)')
    parser.add_argument('--out', default=osp.join(HERE, 'results',
                                                  'family_steps'),
                        help='writes <out>.md and <out>.json')
    parser.add_argument('--update', action='store_true',
                        help='rerun only --families and put their rows into '
                        'the results already in <out>.json')
    args = parser.parse_args()
    args.command = 'python benchmarks/family_steps.py ' + ' '.join(
        sys.argv[1:])
    kept, wall_before = [], 0.0
    if args.update:
        if not args.families:
            parser.error('--update needs --families')
        with open(args.out + '.json') as f:
            before = json.load(f)
        kept, wall_before = before['families'], before['wall_s']
        args.command = f"{before['command'].strip()}, then {args.command}"

    torch.set_num_threads(args.threads)
    limit = int((args.max_memory or _physical_gib()) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings('ignore')
    from mmengine.logging import MessageHub, MMLogger
    MMLogger.get_instance('family_steps', log_level='WARNING')
    # what the train loop records and some heads read (BoxInst's warmup)
    hub = MessageHub.get_instance('family_steps')
    for key, value in dict(iter=0, epoch=0, max_iters=1,
                           max_epochs=1).items():
        hub.update_info(key, value)
    records, start = list(kept), time.time() - wall_before
    rows = {(r['package'], r['family']): i for i, r in enumerate(records)}
    for package in args.packages:
        for count, (family, path) in enumerate(family_configs(package)):
            if args.families and family not in args.families:
                continue
            if args.limit and count >= args.limit:
                break
            rec = Family(package, family, path, args).run()
            if (package, family) in rows:
                records[rows[package, family]] = rec
            else:
                records.append(rec)
            cells = ' '.join(f'{b}:{_cell(rec, b) or "-"}' for b in BITS)
            print(f'{package}/{family}: {rec["status"]} [{rec["batch"]}] '
                  f'{cells} predict:{_predict_cell(rec) or "-"} '
                  f'{rec["seconds"]} s', flush=True)
            for f in rec.get('failures', []):
                print(f'    {f["step"]}: {f["error"]} raised at '
                      f'{f.get("raised_at")} mmdrq frame '
                      f'{f.get("mmdrq_frame")}', flush=True)
            for reason in rec['not_exercised'] or []:
                print(f'    not exercised: {reason[:300]}', flush=True)
            write_results(records, args, time.time() - start, args.out)
            gc.collect()
    s = write_results(records, args, time.time() - start, args.out)
    print(summary_line(s))
    print(f'saved {args.out}.md, {args.out}.json')
    return 1 if s['failed'] else 0


if __name__ == '__main__':
    sys.exit(main())
