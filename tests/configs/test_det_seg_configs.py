"""Every detection and segmentation config builds its model and runs a
forward in loss and in predict mode at every bit on synthetic input."""
import glob
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData, PixelData

import mmdrq
from mmdrq.apis import build_model_from_config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# the QAT configs (``*_drq-*``); an FP32 config (``*_fp32_*``) has no bits,
# and each ``*_tiny`` one trains through tools/train.py in tests/tools
CONFIGS = sorted(
    p for task in ('detection', 'segmentation')
    for p in glob.glob(osp.join(ROOT, 'configs', task, '*_drq-*.py'))
    if not p.endswith('_tiny.py'))


def offline(cfg):
    """No pretrained files, plain BN instead of SyncBN (no process group)."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            if key in ('init_cfg', 'pretrained'):
                cfg[key] = None
            else:
                offline(cfg[key])
        if cfg.get('type') == 'SyncBN':
            cfg['type'] = 'BN'
    elif isinstance(cfg, list):
        for item in cfg:
            offline(item)


def detection_batch(size=64):
    """Two images with two boxes each and their masks (the boxes filled:
    Mask R-CNN's loss reads them, the others ignore them)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    boxes = [[8, 12, 40, 50], [20, 14, 60, 58]]
    masks = np.zeros((2, size, size), np.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = 1
    samples = []
    for i in range(2):
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.tensor(boxes, dtype=torch.float32),
            labels=torch.tensor([i, 2]),
            masks=BitmapMasks(masks, size, size))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, size, size),
                                      dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)


SEG_SIZE = 32


def segmentation_batch(num_classes, size=SEG_SIZE):
    from mmseg.structures import SegDataSample
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(
            img_shape=(size, size), ori_shape=(size, size),
            pad_shape=(size, size)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, size, size)))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, size, size),
                                      dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_forward_at_every_bit(path):
    torch.manual_seed(0)
    cfg = Config.fromfile(path)
    offline(cfg.model)
    if '/segmentation/' in path:
        # mmseg's preprocessor pads training batches to its crop size
        # (512x512 in the ADE20K configs): keep the synthetic batch small
        cfg.model.architecture.data_preprocessor.size = (SEG_SIZE, SEG_SIZE)
    model, _ = build_model_from_config(cfg)
    bits = tuple(cfg.model.quantizer.bits)
    assert model.bits == bits
    assert cfg.val_cfg.type == 'mmdrq.MultiBitValLoop'
    detection = '/detection/' in path
    batch = detection_batch() if detection else segmentation_batch(
        cfg.model.architecture.decode_head.num_classes, SEG_SIZE)
    for bit in bits:
        with mmdrq.use_bits(model.architecture, bit):
            model.train()
            data = model.data_preprocessor(batch, True)
            with torch.no_grad():  # a forward is asked for; no backward
                losses = model(**data, mode='loss')
            loss, _ = model.parse_losses(losses)
            assert torch.isfinite(loss), (bit, losses)
            model.eval()
            with torch.no_grad():
                preds = model(**model.data_preprocessor(batch, False),
                              mode='predict')
            assert len(preds) == 2
            key = 'pred_instances' if detection else 'pred_sem_seg'
            assert key in preds[0]
