"""Evaluate a trained mmdrq model at every bit-width on a dataset laid out
as mmdet / mmseg document it (COCO val2017, ADE20K validation, ...) and
write a markdown table and JSON with the metrics and images/s per bit.

    python tools/benchmark.py CONFIG CKPT --data-root data/coco/ \
        [--subnets a.json ...] [--bits 8 4] [--out-dir DIR] \
        [--cfg-options k=v ...] [--launcher pytorch]
        [--backend onnxruntime [--ort-kernels integer]]

With ``--backend onnxruntime`` CKPT is an export folder
(tools/export_onnx.py) and its ONNX files run in ONNX Runtime.
"""
import argparse
import json
import os
import os.path as osp

from mmengine.runner import Runner

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.tools_common import (add_common_args, configure_test,
                                finish_launch, is_qat_config, load_config,
                                prepare_launch)


def point_at(cfg, data_root: str):
    """Test data (and a COCO evaluator's ann_file) under ``data_root``."""
    dataset = cfg.test_dataloader.dataset
    old = dataset.get('data_root', '')
    dataset.data_root = data_root
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) \
        else [cfg.test_evaluator]
    for evaluator in evaluators:
        ann = evaluator.get('ann_file')
        if ann and old and ann.startswith(old):
            evaluator.ann_file = osp.join(data_root, ann[len(old):])


def write_tables(metrics: dict, out_dir: str) -> str:
    settings, names = [], []
    for key in metrics:
        name, _, setting = key.rpartition('@')
        if setting not in settings:
            settings.append(setting)
        if name not in names:
            names.append(name)
    lines = ['| setting | ' + ' | '.join(names) + ' |',
             '|---' * (len(names) + 1) + '|']
    for setting in settings:
        cells = [metrics.get(f'{n}@{setting}') for n in names]
        lines.append(f'| {setting} | ' + ' | '.join(
            f'{c:.4f}' if isinstance(c, float) else str(c) for c in cells)
            + ' |')
    table = '\n'.join(lines)
    os.makedirs(out_dir, exist_ok=True)
    with open(osp.join(out_dir, 'benchmark.md'), 'w') as f:
        f.write(table + '\n')
    with open(osp.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(metrics, f, indent=1)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--data-root', required=True)
    parser.add_argument('--bits', type=int, nargs='+')
    parser.add_argument('--subnets', nargs='+')
    parser.add_argument('--out-dir', default='work_dirs/benchmark')
    parser.add_argument('--backend', default='pytorch',
                        choices=['pytorch', 'onnxruntime'])
    parser.add_argument('--ort-kernels', default='exact',
                        choices=['exact', 'integer'])
    add_common_args(parser)
    args = parser.parse_args()
    if not osp.isdir(args.data_root):
        parser.error(f'--data-root {args.data_root!r} is not a folder')
    cfg = load_config(args)
    if not is_qat_config(cfg):
        raise ValueError(f'{args.config}: model.type '
                         f'{cfg.model.get("type")!r} is not an mmdrq model')
    point_at(cfg, args.data_root)
    configure_test(cfg, args.checkpoint, args.bits or 'all', args.subnets,
                   args.backend, args.ort_kernels, measure_speed=True)
    prepare_launch(cfg)
    metrics = Runner.from_cfg(cfg).test()
    metrics = {k: float(v) for k, v in metrics.items()
               if hasattr(v, '__float__')}  # numpy scalars too
    print(write_tables(metrics, args.out_dir))
    print(f'wrote {args.out_dir}/benchmark.md and benchmark.json')
    finish_launch()


if __name__ == '__main__':
    main()
