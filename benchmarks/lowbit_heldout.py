"""Low-bit detection and segmentation, held out: the recommended recipes and
the low-bit options measured on real-image sets that no option or default
was chosen on, beside the sets they were chosen on, in separate columns.

Tuning sets: the low-bit benchmark's own (``real_det``: coins and galaxies;
``real_seg``: coins and nuclei), whose runs this script shares with
benchmarks/lowbit_detseg.py (same work folder and options, so a run either
made is reused). Held-out sets (``mmdrq.datasets.HELD_OUT_SETS``): letters
of a scanned page and bricks of a wall (FCOS-R18, bbox mAP), retinal vessels
and a dahlia (FCN-R18-D8, mIoU), one class each, with three times the
validation crops of the tuning sets. For every set and seed: the FP32
model, the FP32 control trained on as long as the QAT (300 iterations, the
goals' reference), and one QAT run per row.

    python benchmarks/lowbit_heldout.py [--seeds 0 1 2]
        [--sets real_det glyph brick real_seg vessel flower]
        [--rows recipe fp_distill]

Writes benchmarks/results/lowbit_heldout.md (mean ± sample std per bit)
and lowbit_heldout.json, from the runs of this call (finished runs are
reused, so a call with every set and row only trains what is new).
"""
import argparse
import os
import os.path as osp
import time

import lowbit_detseg as base

from mmdrq.datasets import HELD_OUT_SETS
from mmdrq.utils import atomic_write, atomic_write_json

BITS = base.BITS
# set -> (task, role, writer arguments (sources, scale, crops))
SETS = {'real_det': ('det', 'tuning', {}), 'real_seg': ('seg', 'tuning', {})}
for _name, (_kind, _sources, _args) in HELD_OUT_SETS.items():
    SETS[_name] = ('det' if _kind == 'detection' else 'seg', 'held out',
                   dict(_args, sources=_sources,
                        num_train=96 if _kind == 'detection' else 64,
                        num_val=48))
# the recommended configs' rows and the options on top of them
ROWS = {
    'recipe': {task: base.ROWS[spec['recommended'][1]][task]
               for task, spec in base.TASKS.items()},
    'fp_distill': dict(
        det=base.ROWS['freeze_bn_stats_late_long_qat_fp_distill']['det'],
        seg=base.ROWS['freeze_bn_stats_long_qat_fp_distill']['seg']),
}
ROWS['step_shift'] = {
    task: options + ['model.quantizer.weight_quantizer.step_shift=mse']
    for task, options in ROWS['recipe'].items()}
CONTROL = 'fp32_trained_on_long'
# w8/w6/w4 within 0.5 of the control, w2 within 3 mAP / 2 mIoU
TOLERANCE = dict(det=3.0, seg=2.0)


def class_options(task: str, classes: tuple, qat: bool) -> list:
    """``--cfg-options`` for a one-source set: its class names in every
    dataloader, and the heads' class count (under ``architecture`` in the
    QAT wrapper)."""
    model = 'model.architecture' if qat else 'model'
    if task == 'det':
        heads, names = ['bbox_head'], list(classes)
    else:
        heads, names = ['decode_head', 'auxiliary_head'], \
            ['background', *classes]
    options = [f'{model}.{head}.num_classes={len(names)}' for head in heads]
    for split in ('train', 'val', 'test'):
        options.append(f'{split}_dataloader.dataset.metainfo.classes='
                       f'[{",".join(names)}]')
        if task == 'seg':  # mmseg wants one colour per class
            colours = ['[0,0,0]'] + ['[220,40,40]'] * len(classes)
            options.append(f'{split}_dataloader.dataset.metainfo.palette='
                           f'[{",".join(colours)}]')
    return options


def run_set(name: str, args) -> dict:
    """FP32, the control and every row of set ``name`` for every seed:
    ``{'fp32'|CONTROL|row: {seed: value or {bit: value}}, 'seconds': ...}``."""
    task, role, writer = SETS[name]
    spec = base.TASKS[task]
    data = osp.join(osp.abspath(args.data_dir), name)
    spec['write'](data, seed=0, **writer)
    options = base.data_options(task, data)
    extra = dict(fp32=[], qat=[])
    if role == 'held out':
        extra = {kind: class_options(task, writer['sources'], kind == 'qat')
                 for kind in ('fp32', 'qat')}
        work_root = osp.join(osp.abspath(args.work_dir), name)
    else:  # lowbit_detseg.py's folder: its runs are reused
        work_root = osp.join(osp.abspath(args.lowbit_work_dir), task)
    # last, so that they win (a smoke test's iterations)
    extra = {kind: [*value, *args.options] for kind, value in extra.items()}

    def value(metrics, suffix=''):
        return metrics[spec['metric'] + suffix] * spec['scale']

    out = dict(task=task, role=role, fp32={}, control={}, rows={},
               seconds={})
    for seed in args.seeds:
        work = osp.join(work_root, f'seed{seed}')
        fp, ckpt, _ = base.train_and_test(
            spec['fp32'], osp.join(work, 'fp32'), seed,
            options + extra['fp32'])
        out['fp32'][seed] = value(fp)
        control, _, _ = base.train_and_test(
            spec['fp32'], osp.join(work, CONTROL), seed,
            [*options, f'load_from={ckpt}', *base.CONTROLS[CONTROL],
             *extra['fp32']])
        out['control'][seed] = value(control)
        for row in args.rows:
            metrics, _, seconds = base.train_and_test(
                spec['qat'], osp.join(work, row if role == 'held out' else
                                      _lowbit_row(row, task)), seed,
                [*options, f'load_from={ckpt}',
                 *base.with_fp32(ROWS[row][task], ckpt), *extra['qat']])
            cells = out['rows'].setdefault(row, {str(b): {} for b in BITS})
            for b in BITS:
                cells[str(b)][seed] = value(metrics, f'@w{b}a{b}')
            out['seconds'].setdefault(row, {})[seed] = seconds
        print(f'{name} seed {seed}: FP32 {out["fp32"][seed]:.1f}, control '
              f'{out["control"][seed]:.1f}; ' + '; '.join(
                  f'{row} ' + ' '.join(f'{cells[str(b)][seed]:.1f}'
                                       for b in BITS)
                  for row, cells in out['rows'].items()), flush=True)
    return out


def _lowbit_row(row: str, task: str) -> str:
    """lowbit_detseg.py's folder name of ``row`` (same options)."""
    for name, per_task in base.ROWS.items():
        if per_task.get(task) == ROWS[row][task]:
            return name
    return f'heldout_{row}'


def _cell(values: dict) -> str:
    mean, std = base.summarize(list(values.values()))
    return f'{mean:.1f} ± {std:.1f}'


def _gap(values: dict, reference: dict) -> float:
    """Mean over seeds of ``values - reference`` (seed by seed)."""
    return sum(values[s] - reference[s] for s in values) / len(values)


def table(results: dict) -> str:
    """One markdown table per task: sets x rows x bits."""
    lines = ['# Low-bit detection and segmentation, held out\n',
             'One-shot {8,6,4,2} Double Rounding QAT (ALRS, 300 iterations) '
             'from each seed\'s FP32 checkpoint; mean ± sample std over the '
             'seeds (benchmarks/lowbit_heldout.py). Tuning sets: the options '
             'and defaults were chosen on them. Held-out sets: measured once '
             'the choices were made. control: the FP32 checkpoint trained on '
             'for the QAT\'s 300 iterations (Adam 2e-4, frozen BN '
             'statistics), the goals\' reference. w8-w4 gap: the largest '
             'mean of (control - bit) over w8, w6, w4 (goal <= 0.5); w2 gap: '
             'mean of (control - w2) (goal <= 3 mAP / 2 mIoU); both seed by '
             'seed.\n']
    for task, title in (('det', base.TASKS['det']['name']),
                        ('seg', base.TASKS['seg']['name'])):
        sets = {n: r for n, r in results.items() if r['task'] == task}
        if not sets:
            continue
        lines += [f'\n## {title}\n',
                  '| set | role | row | seeds | FP32 | control | '
                  + ' | '.join(f'w{b}a{b}' for b in BITS)
                  + ' | w8-w4 gap | w2 gap | goals | QAT s/run |',
                  '|---' * (len(BITS) + 10) + '|']
        for name, content in sets.items():
            control = content['control']
            for row, cells in content['rows'].items():
                high = max(_gap(control, cells[str(b)]) for b in BITS[:-1])
                low = _gap(control, cells[str(min(BITS))])
                met = high <= 0.5 and low <= TOLERANCE[task]
                seconds = content['seconds'][row]
                lines.append(
                    f'| {name} | {content["role"]} | {row} | {len(control)} | '
                    f'{_cell(content["fp32"])} | {_cell(control)} | '
                    + ' | '.join(_cell(cells[str(b)]) for b in BITS)
                    + f' | {high:+.1f} | {low:+.1f} | '
                    f'{"met" if met else "not met"} | '
                    f'{sum(seconds.values()) / len(seconds):.0f} |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--sets', nargs='+', choices=list(SETS),
                        default=list(SETS))
    parser.add_argument('--rows', nargs='+', choices=list(ROWS),
                        default=['recipe', 'fp_distill'])
    parser.add_argument('--work-dir', default='work_dirs/lowbit_heldout')
    parser.add_argument('--lowbit-work-dir', default='work_dirs/lowbit_detseg',
                        help='lowbit_detseg.py\'s work folder (the tuning '
                        'sets\' runs)')
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--options', nargs='+', default=[],
                        help='more --cfg-options for every run, last (e.g. '
                        'train_cfg.max_iters=2 for a smoke test)')
    parser.add_argument('--out-dir', default=osp.join(base.HERE, 'results'))
    args = parser.parse_args()
    # the tools measure this checkout's mmdrq, not an installed copy
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (base.ROOT, os.environ.get('PYTHONPATH')) if p)
    start = time.time()
    results = {name: run_set(name, args) for name in args.sets}
    atomic_write_json(osp.join(args.out_dir, 'lowbit_heldout.json'), results)
    text = table(results)
    atomic_write(osp.join(args.out_dir, 'lowbit_heldout.md'),
                 lambda f: f.write(text.encode()))
    print(text)
    print(f'{time.time() - start:.0f} s; saved lowbit_heldout.json and .md '
          f'in {args.out_dir}')


if __name__ == '__main__':
    main()
