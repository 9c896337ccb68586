"""The real-image detection and segmentation datasets (scikit-image sample
images) load in mmdet and mmseg through the benchmark's configs, are
deterministic and replace a folder only once complete; the benchmark
script runs FP32 + QAT through the tools and writes its table and JSON."""
import json
import os
import os.path as osp

import numpy as np
import pytest

from conftest import ROOT, TOOLS, folder_digest, run_tool

pytest.importorskip('skimage')

DET_FP32 = osp.join(ROOT, 'configs/detection/fcos_r18_gn-head_fp32_real.py')
SEG_FP32 = osp.join(ROOT, 'configs/segmentation/fcn_r18-d8_fp32_real.py')


def _dataset(config, key, root):
    """The ``key`` dataloader's dataset of ``config`` on ``root``, built by
    its package's registry (real CocoDataset / BaseSegDataset)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(config)
    scope = cfg.default_scope
    init_default_scope(scope)
    registry = __import__(f'{scope}.registry', fromlist=['DATASETS'])
    dataset = cfg[f'{key}_dataloader'].dataset
    dataset.data_root = root
    return registry.DATASETS.build(dataset)


def test_detection_dataset_loads_in_mmdet(tmp_path):
    from mmdrq.datasets import DET_CLASSES, write_real_detection
    root = str(tmp_path / 'det')
    counts = write_real_detection(root, num_train=3, num_val=2, seed=0)
    for key, split, images in (('train', 'train', 3), ('val', 'val', 2)):
        dataset = _dataset(DET_FP32, key, root)
        assert dataset.metainfo['classes'] == DET_CLASSES
        with open(osp.join(root, 'annotations',
                           f'instances_{split}.json')) as f:
            content = json.load(f)
        assert len(content['images']) == images * len(DET_CLASSES)
        assert len(content['annotations']) == counts[split] > 0
        # every annotation's box encloses exactly ``area`` bright pixels of
        # its own crop: a coin or a galaxy, not the dark background
        labels = {a['category_id'] for a in content['annotations']}
        assert labels <= {1, 2}
        for ann in content['annotations']:
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
            assert 16 <= ann['area'] <= w * h
        sample = dataset[0]
        boxes = sample['data_samples'].gt_instances.bboxes.tensor
        assert sample['inputs'].shape[1:] == (96, 96)
        assert len(boxes) > 0 and (boxes[:, 2:] > boxes[:, :2]).all()


def test_segmentation_dataset_loads_in_mmseg(tmp_path):
    from mmdrq.datasets import SEG_CLASSES, write_real_segmentation
    root = str(tmp_path / 'seg')
    counts = write_real_segmentation(root, num_train=2, num_val=2, seed=0)
    assert counts == {'train': 4, 'val': 4}
    seen = set()
    for key in ('train', 'val'):
        dataset = _dataset(SEG_FP32, key, root)
        assert dataset.metainfo['classes'] == SEG_CLASSES
        assert len(dataset) == 4
        for index in range(len(dataset)):
            sample = dataset[index]
            labels = sample['data_samples'].gt_sem_seg.data
            assert sample['inputs'].shape[1:] == labels.shape[1:] == (64, 64)
            name = osp.basename(sample['data_samples'].img_path)
            values = set(np.unique(labels.numpy()).tolist())
            # a crop holds background and its own source's class only
            assert values <= {0, SEG_CLASSES.index(name.split('_')[0])}
            seen |= values
    assert seen == {0, 1, 2}


def test_writers_never_replace_a_folder_they_did_not_write(tmp_path):
    """A user's folder, the data folder or a dataset of the other kind is
    refused before anything is written (issue 25: they were deleted)."""
    from mmdrq.datasets import write_real_detection, write_real_segmentation
    mine = tmp_path / 'mine'
    mine.mkdir()
    (mine / 'notes.txt').write_text('keep')
    for write in (write_real_detection, write_real_segmentation):
        with pytest.raises(FileExistsError, match='holds other files'):
            write(str(mine), 2, 1, seed=0)
    assert os.listdir(mine) == ['notes.txt']
    seg = str(tmp_path / 'seg')
    write_real_segmentation(seg, 2, 1, seed=0)
    before = folder_digest(seg)
    with pytest.raises(FileExistsError, match='holds a segmentation dataset'):
        write_real_detection(seg, 2, 1, seed=0)
    assert folder_digest(seg) == before
    (tmp_path / 'file').write_text('x')
    with pytest.raises(FileExistsError, match='is not a folder'):
        write_real_segmentation(str(tmp_path / 'file'), 2, 1, seed=0)
    assert sorted(os.listdir(tmp_path)) == ['file', 'mine', 'seg']


def test_writers_are_deterministic_and_replace_only_complete_folders(
        tmp_path, monkeypatch):
    from mmdrq.datasets import real_images, write_real_segmentation
    first, again, other = (str(tmp_path / n) for n in ('a', 'b', 'c'))
    write_real_segmentation(first, 2, 1, seed=0)
    write_real_segmentation(again, 2, 1, seed=0)
    write_real_segmentation(other, 2, 1, seed=1)
    assert folder_digest(first) == folder_digest(again) != folder_digest(other)

    # the same settings: kept as is; a failure halfway through a rewrite
    # leaves the old folder and no temporary one
    before = folder_digest(first)
    write_real_segmentation(first, 2, 1, seed=0)
    assert folder_digest(first) == before
    calls = []

    def failing_write(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError('disk full')
        real_write(path, array)

    real_write = real_images._write_png
    monkeypatch.setattr(real_images, '_write_png', failing_write)
    with pytest.raises(OSError, match='disk full'):
        write_real_segmentation(first, 2, 1, seed=5)
    assert folder_digest(first) == before
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']
    monkeypatch.setattr(real_images, '_write_png', real_write)
    write_real_segmentation(first, 2, 1, seed=1)
    assert folder_digest(first) == folder_digest(other)
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c']


@pytest.mark.parametrize('args', [dict(num_train=0), dict(size=0),
                                  dict(num_val=1.5)])
def test_writer_refuses_bad_sizes(tmp_path, args):
    from mmdrq.datasets import write_real_detection
    key, value = next(iter(args.items()))
    with pytest.raises(ValueError, match=f'{key}.*{value}'):
        write_real_detection(str(tmp_path / 'det'), **args)
    assert not os.listdir(tmp_path)


def test_benchmark_runs_and_writes_table_and_json(tmp_path):
    """Segmentation, one seed, two iterations per run: FP32, then QAT from
    its checkpoint, each tested at every bit by tools/test.py; a second
    call reuses both runs."""
    args = [osp.join(ROOT, 'benchmarks', 'lowbit_detseg.py'), '--seeds', '0',
            '--tasks', 'seg', '--rows', 'baseline', '--controls',
            '--crops', '2', '1',
            '--work-dir', tmp_path / 'work', '--data-dir', tmp_path / 'data',
            '--out-dir', tmp_path / 'out', '--options',
            'train_cfg.max_iters=2', 'default_hooks.checkpoint.interval=2',
            # the FP32 config freezes BN statistics from iteration 800
            'custom_hooks.0.begin=1']
    _, log = run_tool(*args)
    with open(tmp_path / 'out' / 'lowbit_detseg.json') as f:
        results = json.load(f)
    assert list(results) == ['seg']
    seg = results['seg']
    work = tmp_path / 'work' / 'seg' / 'seed0'
    with open(work / 'fp32' / 'test_metrics.json') as f:
        assert seg['fp32']['values'] == {'0': json.load(f)['mIoU']}
    with open(work / 'baseline' / 'test_metrics.json') as f:
        metrics = json.load(f)
    row = seg['rows']['baseline']
    assert list(seg['rows']) == ['baseline'] and row['seeds'] == [0]
    for bit in (8, 6, 4, 2):
        value = metrics[f'mIoU@w{bit}a{bit}']
        assert row[str(bit)] == dict(mean=value, std=0.0, values={'0': value})
    with open(work / 'baseline' / 'train.log') as f:
        assert 'Load checkpoint from' in f.read()
    with open(tmp_path / 'out' / 'lowbit_detseg.md') as f:
        text = f.read()
    assert f'FP32: {seg["fp32"]["mean"]:.1f} ± 0.0 (seeds [0])' in text
    line = next(li for li in text.splitlines() if li.startswith('| baseline'))
    assert line.startswith(f'| baseline | 1 | {row["8"]["mean"]:.1f} ± 0.0 |')
    below = row['2']['mean'] - seg['fp32']['mean']
    assert f'| {row["2"]["mean"]:.1f} ± 0.0 | {below:+.1f} ± 0.0 | - |' \
        in line
    assert text in log

    stamp = os.path.getmtime(work / 'baseline' / 'train.log')
    _, log = run_tool(*args)
    assert os.path.getmtime(work / 'baseline' / 'train.log') == stamp
    with open(tmp_path / 'out' / 'lowbit_detseg.json') as f:
        assert json.load(f) == results


def _benchmark():
    """benchmarks/lowbit_detseg.py as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'lowbit_detseg', osp.join(ROOT, 'benchmarks', 'lowbit_detseg.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_keeps_earlier_runs_of_the_same_fp32():
    """Seeds and rows of the earlier JSON that the work folder lacks stay,
    unless the row's options changed or the work folder's FP32 metric of
    that seed differs; the work folder's values win."""
    bench = _benchmark()
    options = bench.ROWS['baseline']['seg']

    def row(values, seconds, options=options):
        return dict({str(b): bench.cell({s: v + b for s, v in values.items()})
                     for b in bench.BITS}, seeds=sorted(values),
                    options=options, seconds=seconds)

    def results(fp, rows):
        return dict(seg=dict(name='seg', fp32=bench.cell(fp), rows=rows))

    old = json.loads(json.dumps(results(
        {0: 10.0, 1: 20.0, 3: 40.0},
        dict(baseline=row({0: 1.0, 1: 2.0, 3: 4.0}, 100.0),
             head_distill=row({0: 5.0}, 50.0, options=['stale']),
             retired=row({0: 6.0}, 50.0)))))
    new = results({1: 21.0, 2: 30.0, 3: 40.0},
                  dict(baseline=row({2: 3.0, 3: 4.5}, 200.0)))
    merged = bench.merge(old, new)
    assert merged['seg']['fp32']['values'] == {0: 10.0, 1: 21.0, 2: 30.0,
                                               3: 40.0}
    assert list(merged['seg']['rows']) == ['baseline']
    base = merged['seg']['rows']['baseline']
    # seed 1's run came from another FP32 checkpoint: dropped
    assert base['seeds'] == [0, 2, 3]
    assert base['2']['values'] == {0: 3.0, 2: 5.0, 3: 6.5}
    assert base['2']['mean'] == pytest.approx((3.0 + 5.0 + 6.5) / 3)
    assert base['seconds'] == pytest.approx((100.0 + 200.0 + 200.0) / 3)
    assert bench.merge(merged, merged) == merged


def test_w2a2_minus_fp32_pairs_each_seed_with_its_checkpoint():
    """The table's w2a2 - FP32 cell: differences seed by seed over the
    seeds both have, mean and sample std; '-' with none in common."""
    bench = _benchmark()
    fp = bench.cell({0: 50.0, 1: 40.0, 2: 20.0})
    rows = dict(
        two={str(b): bench.cell({0: 48.0, 2: 25.0}) for b in bench.BITS},
        other={str(b): bench.cell({7: 1.0}) for b in bench.BITS})
    content = dict(fp32=fp, rows=rows)
    # -2 and +5: mean +1.5, sample std 4.95 (unpaired means: -0.2)
    assert bench.below_fp32(content, 'two') == '+1.5 ± 4.9'
    assert bench.below_fp32(content, 'other') == '-'


def test_controls_collect_merge_and_show(tmp_path):
    """A control counts for a seed when its run started from that seed's
    FP32 checkpoint with the control's options; earlier controls merge like
    rows; the table shows each under FP32."""
    bench = _benchmark()
    options = bench.CONTROLS['fp32_trained_on']

    def record(folder, metrics, checkpoint='', load=None, extra=()):
        used = [*extra, f'load_from={load}', *options] if load else []
        os.makedirs(folder)
        with open(osp.join(folder, 'run.json'), 'w') as f:
            json.dump(dict(settings=dict(options=used), metrics=metrics,
                           checkpoint=checkpoint, seconds=1.0), f)

    work = tmp_path / 'seg'
    for seed, fp in ((0, 80.0), (1, 81.0)):
        record(work / f'seed{seed}' / 'fp32', dict(mIoU=fp), f'fp{seed}.pth')
    record(work / 'seed0' / 'fp32_trained_on', dict(mIoU=83.0),
           load='fp0.pth', extra=['data_root=x'])
    # trained on from another checkpoint: not seed 1's control
    record(work / 'seed1' / 'fp32_trained_on', dict(mIoU=99.0),
           load='old.pth')
    new = bench.collect(str(tmp_path))
    assert new['seg']['controls'] == {'fp32_trained_on': dict(
        bench.cell({0: 83.0}), options=options)}

    old = json.loads(json.dumps(dict(seg=dict(
        name='seg', fp32=bench.cell({0: 80.0, 1: 70.0, 2: 75.0}), rows={},
        controls=dict(fp32_trained_on=dict(
            bench.cell({0: 1.0, 1: 2.0, 2: 3.0}), options=options),
            fp32_trained_on_long=dict(bench.cell({2: 4.0}),
                                      options=['stale']))))))
    merged = bench.merge(old, new)
    # seed 1's FP32 changed: its old control goes; seed 0's new one wins
    assert merged['seg']['controls'] == {'fp32_trained_on': dict(
        bench.cell({0: 83.0, 2: 3.0}), options=options)}
    assert 'control fp32_trained_on: 43.0 ± 56.6 (seeds [0, 2])' in \
        bench.table(merged)


def _lookup(cfg, key: str):
    """The value at a ``--cfg-options`` key (``a.0.b``), or None if the
    config does not set it."""
    for part in key.split('.'):
        if isinstance(cfg, list):
            cfg = cfg[int(part)]
        elif isinstance(cfg, dict) and part in cfg:
            cfg = cfg[part]
        else:
            return None
    return cfg


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_recommended_config_is_its_benchmark_row(task):
    """The row the table names for the recommended config measures that
    config: the config holds each of the row's options (but those it does
    not set, which do nothing there, as switchable_gn_ln=False on FCN,
    which has no GN/LN), and the QAT config with the row's options is the
    recommended config with them."""
    from mmengine.config import Config, DictAction
    bench = _benchmark()
    config, row = bench.TASKS[task]['recommended']
    options = {key: DictAction._parse_iterable(value) for key, value in (
        option.split('=', 1) for option in bench.ROWS[row][task])}
    shipped = Config.fromfile(osp.join(ROOT, config)).to_dict()
    for key, value in options.items():
        assert _lookup(shipped, key) in (None, value), key
    configs = []
    for path in (bench.TASKS[task]['qat'], osp.join(ROOT, config)):
        cfg = Config.fromfile(path)
        cfg.merge_from_dict(options)
        cfg = cfg.to_dict()
        # a variable of the config files, not a key any part reads
        cfg.pop('max_iters')
        configs.append(cfg)
    assert configs[0] == configs[1]


@pytest.mark.parametrize('case', ['same', 'nested', 'user_folder'])
def test_make_real_datasets_refuses_before_writing(tmp_path, monkeypatch,
                                                   case):
    """tools/make_real_datasets.py, run in-process: roots that are one
    folder, one inside the other, or a folder of the user's are refused
    before either dataset is written."""
    import runpy
    import sys
    det, seg = tmp_path / 'det', tmp_path / 'seg'
    if case == 'same':
        seg = det
    elif case == 'nested':
        seg = det / 'seg'
    else:
        seg.mkdir()
        (seg / 'notes.txt').write_text('keep')
    monkeypatch.setattr(sys, 'argv', [
        'make_real_datasets.py', '--det-root', str(det), '--seg-root',
        str(seg), '--det-crops', '2', '1', '--seg-crops', '2', '1'])
    error, message = (ValueError, 'must be separate folders') \
        if case != 'user_folder' else (FileExistsError, 'notes.txt')
    with pytest.raises(error, match=message):
        runpy.run_path(osp.join(TOOLS, 'make_real_datasets.py'),
                       run_name='__main__')
    assert not det.exists()
    assert sorted(os.listdir(tmp_path)) == (['seg'] if case == 'user_folder'
                                            else [])
