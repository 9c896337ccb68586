"""The held-out low-bit benchmark's sets load in mmdet and mmseg with their
own classes through the options the benchmark gives the configs, the
writers refuse unknown sources, and the table's goal columns pair each
seed with its own control."""
import importlib.util
import json
import os
import os.path as osp
import sys

import numpy as np
import pytest

from conftest import ROOT

pytest.importorskip('skimage')


@pytest.fixture(scope='module')
def bench():
    """benchmarks/lowbit_heldout.py as a module (it imports its sibling
    lowbit_detseg.py, as when run as a script)."""
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    try:
        spec = importlib.util.spec_from_file_location(
            'lowbit_heldout', osp.join(ROOT, 'benchmarks', 'lowbit_heldout.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(osp.join(ROOT, 'benchmarks'))
    return module


def _config(path, options):
    from mmengine.config import Config, DictAction
    cfg = Config.fromfile(path)
    cfg.merge_from_dict({key: DictAction._parse_iterable(value)
                         for key, value in (o.split('=', 1) for o in options)})
    return cfg


@pytest.mark.parametrize('name', ['glyph', 'brick', 'vessel', 'flower'])
def test_held_out_set_loads_with_its_own_classes(bench, tmp_path, name):
    from mmengine.registry import init_default_scope
    task, role, writer = bench.SETS[name]
    assert role == 'held out'
    spec = bench.base.TASKS[task]
    root = str(tmp_path / name)
    counts = spec['write'](root, **dict(writer, num_train=2, num_val=2))
    classes = list(writer['sources']) if task == 'det' else \
        ['background', *writer['sources']]
    data = bench.base.data_options(task, root)
    for config, qat in ((spec['fp32'], False), (spec['qat'], True)):
        cfg = _config(config, data + bench.class_options(
            task, writer['sources'], qat))
        model = cfg.model.architecture if qat else cfg.model
        heads = [model.bbox_head] if task == 'det' else \
            [model.decode_head, model.auxiliary_head]
        assert [h.num_classes for h in heads] == [len(classes)] * len(heads)
    init_default_scope(cfg.default_scope)
    registry = __import__(f'{cfg.default_scope}.registry',
                          fromlist=['DATASETS'])
    dataset = registry.DATASETS.build(cfg.val_dataloader.dataset)
    assert list(dataset.metainfo['classes']) == classes
    if task == 'det':
        with open(osp.join(root, 'annotations', 'instances_val.json')) as f:
            content = json.load(f)
        assert {a['category_id'] for a in content['annotations']} == {1}
        assert len(content['annotations']) == counts['val'] > 0
        assert len(dataset) == 2
        assert len(dataset[0]['data_samples'].gt_instances) > 0 or \
            len(dataset[1]['data_samples'].gt_instances) > 0
    else:
        seen = set()
        for index in range(len(dataset)):
            labels = dataset[index]['data_samples'].gt_sem_seg.data
            seen |= set(np.unique(labels.numpy()).tolist())
        assert seen <= {0, 1}


@pytest.mark.parametrize('sources', [(), ('nope',), ('glyph', 'glyph')])
def test_writers_refuse_bad_sources(tmp_path, sources):
    from mmdrq.datasets import write_real_detection, write_real_segmentation
    for write in (write_real_detection, write_real_segmentation):
        with pytest.raises(ValueError, match=r'sources .*' + repr(sources)
                           .replace('(', r'\(').replace(')', r'\)')):
            write(str(tmp_path / 'set'), 2, 1, sources=sources)
    assert not os.listdir(tmp_path)


def test_table_pairs_each_seed_with_its_control(bench):
    """w8-w4 gap: the largest mean (control - bit) over the high bits; w2
    gap: mean (control - w2); goals met when <= 0.5 and <= 3 (det)."""
    control = {0: 50.0, 1: 40.0, 2: 45.0}
    rows = dict(
        # w8 0.4 below each seed's control, w2 2.9 below: met
        close={'8': {s: v - 0.4 for s, v in control.items()},
               '6': dict(control), '4': dict(control),
               '2': {s: v - 2.9 for s, v in control.items()}},
        # w4 1.0 below on seed 0 only: mean gap 0.33 (met); w2 -3.5
        far={'8': dict(control), '6': dict(control),
             '4': {0: 49.0, 1: 40.0, 2: 45.0},
             '2': {s: v - 3.5 for s, v in control.items()}})
    results = dict(glyph=dict(task='det', role='held out', fp32=control,
                              control=control, rows=rows,
                              seconds=dict(close={0: 1.0}, far={0: 3.0})))
    text = bench.table(results)
    lines = {line.split(' | ')[2]: line for line in text.splitlines()
             if line.startswith('| glyph')}
    assert lines['close'].endswith('| +0.4 | +2.9 | met | 1 |')
    assert lines['far'].endswith('| +0.3 | +3.5 | not met | 3 |')
    assert '| 3 | 45.0 ± 5.0 | 45.0 ± 5.0 | 44.6 ± 5.0 |' in lines['close']
