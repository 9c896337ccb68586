"""Low-bit detection and segmentation on real images: FP32 training, then
one-shot {8,6,4,2} Double Rounding QAT from that checkpoint (ALRS), for
FCOS-R18 (GN head, bbox mAP) and FCN-R18-D8 (mIoU), over several seeds,
with one row per method option (a set of ``--cfg-options`` on the QAT
config). Data: tools/make_real_datasets.py (scikit-image's sample images).
Each run is the real tools/train.py, then tools/test.py for the metric at
every bit.

    python benchmarks/lowbit_detseg.py [--seeds 0 1 2] [--tasks det seg]
        [--rows baseline ...]

Writes benchmarks/results/lowbit_detseg.md (mean ± sample std per bit) and
lowbit_detseg.json. A run whose work folder holds its metrics, made with
the same config and options, is reused, so a later call with other rows
trains only what is new; rows of the JSON not run now are kept when their
seeds match the FP32 runs of this call.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import time

from mmdrq.datasets import write_real_detection, write_real_segmentation
from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import run_tool

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
TOOLS = osp.join(ROOT, 'tools')
BITS = (8, 6, 4, 2)

TASKS = {
    'det': dict(
        name='detection: FCOS-R18 GN head, bbox mAP',
        fp32=osp.join(ROOT, 'configs/detection/fcos_r18_gn-head_fp32_real.py'),
        qat=osp.join(ROOT,
                     'configs/detection/fcos_r18_gn-head_drq-8642_real.py'),
        # COCO mAP is 0..1: shown in points
        metric='coco/bbox_mAP', scale=100.0,
        write=write_real_detection, data='real_det'),
    'seg': dict(
        name='segmentation: FCN-R18-D8, mIoU',
        fp32=osp.join(ROOT, 'configs/segmentation/fcn_r18-d8_fp32_real.py'),
        qat=osp.join(ROOT, 'configs/segmentation/fcn_r18-d8_drq-8642_real.py'),
        metric='mIoU', scale=1.0,
        write=write_real_segmentation, data='real_seg'),
}

# one row per method option: --cfg-options on the QAT config
ROWS = {
    'baseline': [],
}


def data_options(task: str, root: str):
    """``--cfg-options`` that point every dataloader (and the COCO
    evaluators) at ``root``."""
    options = [f'{k}_dataloader.dataset.data_root={root}'
               for k in ('train', 'val', 'test')]
    if task == 'det':
        ann = osp.join(root, 'annotations', 'instances_val.json')
        options += [f'{k}_evaluator.ann_file={ann}' for k in ('val', 'test')]
    return options


def last_checkpoint(work: str) -> str:
    """The checkpoint MMEngine's ``last_checkpoint`` file names."""
    with open(osp.join(work, 'last_checkpoint')) as f:
        return f.read().strip()


def train_and_test(config, work, seed, options):
    """tools/train.py then tools/test.py of ``config`` in ``work`` (reused
    when ``work/run.json`` records the same config, seed and options);
    returns (metrics, checkpoint, training seconds)."""
    record = osp.join(work, 'run.json')
    settings = dict(config=osp.relpath(config, ROOT), seed=seed,
                    options=list(options))
    if osp.isfile(record):
        with open(record) as f:
            last = json.load(f)
        if last['settings'] == settings and osp.isfile(last['checkpoint']):
            return last['metrics'], last['checkpoint'], last['seconds']
    os.makedirs(work, exist_ok=True)
    if osp.exists(record):
        os.remove(record)
    # no validation while training: tools/test.py measures every bit after
    seconds = run_tool(
        [osp.join(TOOLS, 'train.py'), config, '--work-dir', work,
         '--cfg-options', f'randomness.seed={seed}', *options,
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'],
        osp.join(work, 'train.log'))
    ckpt = last_checkpoint(work)
    out = osp.join(work, 'test_metrics.json')
    run_tool([osp.join(TOOLS, 'test.py'), config, ckpt, '--work-dir', work,
              '--out', out, '--cfg-options', *options],
             osp.join(work, 'test.log'))
    with open(out) as f:
        metrics = json.load(f)
    atomic_write_json(record, dict(settings=settings, metrics=metrics,
                                   checkpoint=ckpt, seconds=seconds))
    return metrics, ckpt, seconds


def summarize(values):
    """(mean, sample std) of ``values``; std 0 for a single value."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values) -> dict:
    mean, std = summarize(values)
    return dict(mean=mean, std=std, values=values)


def table(results) -> str:
    """The markdown table of ``results`` (as in lowbit_detseg.json)."""
    lines = [f'# Low-bit detection and segmentation on real images\n',
             'mean ± sample std over seeds '
             f'{results["seeds"]}; one-shot {{8,6,4,2}} Double Rounding QAT '
             'from each seed\'s FP32 checkpoint, with ALRS.\n']
    for task, content in results['tasks'].items():
        lines += [f'\n## {content["name"]}\n',
                  '| row | FP32 | ' + ' | '.join(f'w{b}a{b}' for b in BITS)
                  + ' | QAT s/run | options |',
                  '|---' * (len(BITS) + 4) + '|']
        fp = content['fp32']
        fp_text = f'{fp["mean"]:.1f} ± {fp["std"]:.1f}'
        for row, cells in content['rows'].items():
            bits = ' | '.join(f'{cells[str(b)]["mean"]:.1f} ± '
                              f'{cells[str(b)]["std"]:.1f}' for b in BITS)
            options = ' '.join(f'`{o}`' for o in cells['options']) or '-'
            lines.append(f'| {row} | {fp_text} | {bits} | '
                         f'{cells["seconds"]:.0f} | {options} |')
    return '\n'.join(lines) + '\n'


def write_results(results, out_dir):
    """``lowbit_detseg.json`` and ``.md`` in ``out_dir``, each atomically."""
    atomic_write_json(osp.join(out_dir, 'lowbit_detseg.json'), results)
    text = table(results)
    atomic_write(osp.join(out_dir, 'lowbit_detseg.md'),
                 lambda f: f.write(text.encode()))


def read_results(path):
    """The results JSON at ``path``, or None."""
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def kept_rows(last, task, fp_values, rows):
    """Rows of ``task`` in the last results not run now, when made from the
    same FP32 results (the same seeds and checkpoints)."""
    content = (last or {}).get('tasks', {}).get(task)
    if not content or content['fp32']['values'] != fp_values:
        return {}
    return {name: cells for name, cells in content['rows'].items()
            if name not in rows}


def run_task(task, args, rows, last):
    spec = TASKS[task]
    root = osp.join(osp.abspath(args.data_dir), spec['data'])
    spec['write'](root, *args.crops or (), seed=args.data_seed)
    options = data_options(task, root) + list(args.options)
    fp_values, raw, seconds = [], {row: {b: [] for b in BITS}
                                   for row in rows}, {row: [] for row in rows}
    for seed in args.seeds:
        work = osp.join(osp.abspath(args.work_dir), task, f'seed{seed}')
        fp, fp_ckpt, fp_seconds = train_and_test(
            spec['fp32'], osp.join(work, 'fp32'), seed, options)
        fp_values.append(fp[spec['metric']] * spec['scale'])
        print(f'{task} seed {seed} FP32: {fp_values[-1]:.1f} '
              f'({fp_seconds:.0f} s)', flush=True)
        for row, row_options in rows.items():
            metrics, _, qat_seconds = train_and_test(
                spec['qat'], osp.join(work, row), seed,
                [*options, f'load_from={fp_ckpt}', *row_options])
            for b in BITS:
                raw[row][b].append(
                    metrics[f'{spec["metric"]}@w{b}a{b}'] * spec['scale'])
            seconds[row].append(qat_seconds)
            print(f'{task} seed {seed} {row}: ' + ', '.join(
                f'w{b} {raw[row][b][-1]:.1f}' for b in BITS) +
                f' ({qat_seconds:.0f} s)', flush=True)
    content = dict(name=spec['name'], fp32=cell(fp_values), rows={})
    kept = kept_rows(last, task, content['fp32']['values'], rows)
    for row in ROWS:
        if row in rows:
            content['rows'][row] = {str(b): cell(raw[row][b]) for b in BITS}
            content['rows'][row].update(
                options=rows[row], seconds=statistics.mean(seconds[row]))
        elif row in kept:
            content['rows'][row] = kept[row]
    return content


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS),
                        default=list(TASKS))
    parser.add_argument('--rows', nargs='+', choices=list(ROWS),
                        default=list(ROWS), help='QAT rows to run')
    parser.add_argument('--work-dir', default='work_dirs/lowbit_detseg')
    parser.add_argument('--data-dir', default='data')
    parser.add_argument('--data-seed', type=int, default=0,
                        help='seed of the datasets\' crops (fixed across '
                        'training seeds)')
    parser.add_argument('--crops', type=int, nargs=2, metavar=('TRAIN', 'VAL'),
                        help='crops per source in each split (default: the '
                        'writers\')')
    parser.add_argument('--options', nargs='+', default=[],
                        help='more --cfg-options for every run, e.g. '
                        'train_cfg.max_iters=2 for a smoke test')
    parser.add_argument('--out-dir', default=osp.join(HERE, 'results'))
    args = parser.parse_args()
    json_path = osp.join(args.out_dir, 'lowbit_detseg.json')
    rows = {row: ROWS[row] for row in args.rows}
    results = dict(seeds=args.seeds, tasks={})
    start = time.time()
    for task in TASKS:
        if task in args.tasks:
            results['tasks'][task] = run_task(task, args, rows,
                                              read_results(json_path))
    # the other tasks' results as they are now (another call may have
    # written them meanwhile), when made with the same seeds
    last = read_results(json_path)
    if last and last.get('seeds') == args.seeds:
        for task in TASKS:
            if task not in args.tasks and task in last['tasks']:
                results['tasks'][task] = last['tasks'][task]
    results['tasks'] = {task: results['tasks'][task] for task in TASKS
                        if task in results['tasks']}
    write_results(results, args.out_dir)
    print(table(results))
    print(f'{time.time() - start:.0f} s; saved {json_path} and .md')


if __name__ == '__main__':
    main()
