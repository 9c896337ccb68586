"""Detection (mmdet RetinaNet) and segmentation (mmseg DeepLabV3) through
the real tools on tiny synthetic datasets: tools/make_tiny_datasets.py
writes them, tools/train.py trains every bit for a few iterations and
validates every bit, tools/test.py evaluates the checkpoint at every bit.
Each step is a subprocess, as a user runs it. Both pipelines together take
well under a minute on 2 CPU cores."""
import json
import math
import os
import os.path as osp

import numpy as np
import pytest

from conftest import TOOLS, folder_digest, logged, run_tool, tiny_data_options

pytestmark = pytest.mark.slow  # trains through the tools

BITS = (8, 6, 4, 2)


def test_tiny_datasets_are_deterministic_and_consistent(data, tmp_path):
    import cv2
    from mmdrq.datasets import tiny_shapes as tiny
    # same seed: the same bytes; another seed: other images
    tiny.write_tiny_coco(str(tmp_path / 'coco'))
    tiny.write_tiny_ade20k(str(tmp_path / 'ade'))
    assert folder_digest(tmp_path / 'coco') == folder_digest(data['coco'])
    assert folder_digest(tmp_path / 'ade') == folder_digest(data['ade20k'])
    tiny.write_tiny_coco(str(tmp_path / 'coco1'), seed=1)
    assert folder_digest(tmp_path / 'coco1') != folder_digest(data['coco'])
    assert not [n for _, _, files in os.walk(tmp_path) for n in files
                if n.endswith('.tmp')]

    for split in ('train', 'val'):
        with open(osp.join(data['coco'], 'annotations',
                           f'instances_{split}.json')) as f:
            content = json.load(f)
        assert len(content['images']) == 8
        assert {a['category_id'] for a in content['annotations']} == {1, 2, 3}
        images = {i['id']: i for i in content['images']}
        for ann in content['annotations']:
            info = images[ann['image_id']]
            image = cv2.imread(osp.join(data['coco'], split,
                                        info['file_name']))
            assert image.shape == (info['height'], info['width'], 3) == \
                (96, 128, 3)
            x, y, w, h = ann['bbox']
            assert ann['iscrowd'] == 0 and 0 < ann['area'] <= w * h
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 96
            mask = np.zeros(image.shape[:2], np.uint8)
            polygon = np.array(ann['segmentation'][0]).reshape(-1, 2)
            cv2.fillPoly(mask, [polygon.round().astype(np.int32)], 1)
            assert mask.sum() == ann['area']
            # the object is drawn in its category's colour (JPEG: roughly)
            colour = image[mask.astype(bool)].mean(0)
            expected = tiny._COLOURS[tiny.COCO_CLASSES[ann['category_id']
                                                       - 1]]
            assert np.abs(colour - expected).max() < 30, (ann, colour)

    for split in ('training', 'validation'):
        names = sorted(os.listdir(osp.join(data['ade20k'], 'images', split)))
        assert len(names) == 8
        for name in names:
            image = cv2.imread(osp.join(data['ade20k'], 'images', split,
                                        name))
            label = cv2.imread(
                osp.join(data['ade20k'], 'annotations', split,
                         name.replace('.jpg', '.png')), cv2.IMREAD_UNCHANGED)
            assert label.shape == image.shape[:2] == (64, 64)
            assert label.dtype == np.uint8
            assert set(np.unique(label)) <= {0, 1, 2, 3}
            assert (label[0] == 0).all() and (label[2:-2, 2:-2] != 0).all()
            for value, kind in ((2, 'rectangle'), (3, 'ellipse')):
                inside = label == value
                if inside.sum() > 20:
                    colour = image[inside].mean(0)
                    assert np.abs(colour - tiny._COLOURS[kind]).max() < 30


CASES = {
    # name: config, dataset, checkpoint, metric, valid range
    'retinanet': ('configs/detection/retinanet_r18_drq-8642_tiny.py',
                  'coco', 'epoch_1.pth', 'coco/bbox_mAP',
                  (0.0, 1.0)),
    'deeplabv3': ('configs/segmentation/deeplabv3_r18_drq-8642_tiny.py',
                  'ade20k', 'iter_4.pth', 'mIoU',
                  (0.0, 100.0)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_train_and_test_every_bit(name, data, tiny_training, tmp_path):
    config, dataset, ckpt, metric, (low, high) = CASES[name]
    cfg_options = ['--cfg-options'] + tiny_data_options(dataset, data[dataset])
    work, log = tiny_training(config, dataset)

    # every bit trains every iteration (logger interval 1, 4 iterations),
    # with finite losses, and validation covers every bit
    assert 'mmdrq conversion of' in log
    for bit in BITS:
        losses = logged(log, f'loss@w{bit}a{bit}')
        assert len(losses) == 4, (bit, losses)
        assert all(math.isfinite(v) and v > 0 for v in losses), (bit, losses)
        assert logged(log, f'w{bit}a{bit}_scale_lr')
    assert 'val metrics per bit-width' in log
    val = {bit: logged(log, f'{metric}@w{bit}a{bit}') for bit in BITS}
    assert all(val.values()), val
    assert osp.exists(work / ckpt)

    out = tmp_path / 'metrics.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), config, work / ckpt,
                   '--work-dir', tmp_path / 'test', '--out', out,
                   *cfg_options)
    assert 'test metrics per bit-width' in log and '| w2a2 |' in log
    metrics = json.loads(out.read_text())
    print(f'\n{name} per-bit {metric} (test.py): ' + ', '.join(
        f'w{b}a{b}={metrics[f"{metric}@w{b}a{b}"]:.4f}' for b in BITS))
    for bit in BITS:
        value = metrics[f'{metric}@w{bit}a{bit}']
        assert isinstance(value, float) and low <= value <= high, \
            (bit, value)
        # the checkpoint reproduces the end-of-training validation at every
        # bit (weights, per-bit BN and activation scales all reloaded)
        assert abs(value - val[bit][-1]) < 1e-3, (bit, value, val[bit])

    # tools/benchmark.py: the same metrics plus images/s, as md and JSON
    root = data[dataset] + ('/' if dataset == 'coco' else '')
    bench = tmp_path / 'bench'
    run_tool(osp.join(TOOLS, 'benchmark.py'), config, work / ckpt,
             '--data-root', root, '--out-dir', bench, '--work-dir',
             tmp_path / 'bench_work')
    table = json.loads((bench / 'benchmark.json').read_text())
    for bit in BITS:
        assert abs(table[f'{metric}@w{bit}a{bit}'] -
                   metrics[f'{metric}@w{bit}a{bit}']) < 1e-6
        assert table[f'images_per_s@w{bit}a{bit}'] > 0
    assert '| w4a4 |' in (bench / 'benchmark.md').read_text()
