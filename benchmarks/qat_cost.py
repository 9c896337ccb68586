"""QAT cost against accuracy per bit-width schedule on the digits example.

The paper's schedule (every bit every iteration) is the baseline, against the
cheaper ones of ``bit_schedule`` (docs/training.md, Cheaper schedules), the
same number of epochs each, run in turns on the same machine. Each run is
the real tools/train.py and tools/test.py, from the seed's FP32 checkpoint.

    python benchmarks/qat_cost.py [--seeds 0 1 2] [--schedules all sandwich ...]
        [--qat-epochs 10] [--extra all:5 sandwich:7 ...] [--out PATH]

Prints, per schedule: bits trained per iteration, the QAT wall time of
tools/train.py (mean over seeds, and against the baseline's), the steps
each bit got (from the final checkpoint's runtime info) and top-1 at every
bit (mean ± sample std); saves benchmarks/results/qat_cost.json and .md
(``--out``).
"""
import argparse
import json
import os.path as osp
import shutil
import sys

import torch

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)
from mmdrq.datasets import write_digits
from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import train_and_test

from fidelity_digits import (FP32_CONFIG, QAT_CONFIG, TOOLS, finished_run,
                             summarize)

HERE = osp.dirname(osp.abspath(__file__))
BITS = (8, 6, 4, 2)
SCHEDULES = {
    'all': [],
    'sandwich': ['model.bit_schedule.kind=sandwich'],
    'random': ['model.bit_schedule.kind=random'],
    'random_loss': ['model.bit_schedule.kind=random',
                    'model.bit_schedule.weights=loss'],
    'progressive': ['model.bit_schedule.kind=progressive'],
}


def run_record(work: str, ckpt: str):
    """(seconds of the training loop alone: MMEngine's logged mean
    iteration time times the iterations, no start-up or final test; the
    steps each bit trained) from the run's log and its final checkpoint's
    runtime info (the every-bit schedule records no steps: every iteration
    trains every bit)."""
    import glob
    logs = sorted(glob.glob(osp.join(work, '*', 'vis_data', 'scalars.json')))
    with open(logs[0]) as f:  # the training run's (the test's comes after)
        times = [json.loads(line)['time'] for line in f if '"time"' in line]
    info = torch.load(ckpt, map_location='cpu',
                      weights_only=True)['message_hub']['runtime_info']
    steps = info.get('bit_schedule_steps') or {b: info['iter'] for b in BITS}
    return (sum(times) / len(times) * info['iter'],
            {b: steps.get(b, 0) for b in BITS})


def largest_drop(base, top1) -> str:
    """The largest (every-bit mean - mean) over the bits, or '-'."""
    if base is None:
        return '-'
    drop = max(summarize(base['top1'][b])[0] - mean
               for b, (mean, _) in top1.items())
    return f'{drop:+.2f}'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--schedules', nargs='+', choices=list(SCHEDULES),
                        default=list(SCHEDULES))
    parser.add_argument('--work-dir', default='work_dirs/qat_cost')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=int, default=30)
    parser.add_argument('--qat-epochs', type=int, default=10)
    parser.add_argument('--out', default=osp.join(HERE, 'results',
                                                  'qat_cost'),
                        help='writes OUT.json and OUT.md')
    parser.add_argument('--extra', nargs='*', default=[],
                        metavar='SCHEDULE:EPOCHS',
                        help='also run SCHEDULE for EPOCHS (the same '
                        'accuracy in less time?)')
    args = parser.parse_args()
    work, root = osp.abspath(args.work_dir), osp.abspath(args.data_root)
    write_digits(root)
    runs = [(name, args.qat_epochs) for name in args.schedules]
    for item in args.extra:
        name, epochs = item.split(':')
        if name not in SCHEDULES:
            parser.error(f'--extra: unknown schedule {name!r}')
        runs.append((name, int(epochs)))
    raw = {f'{n}@{e}': dict(seconds=[], loop=[], steps=[],
                            top1={b: [] for b in BITS}) for n, e in runs}
    fp32 = []
    for seed in args.seeds:
        fp_work = osp.join(work, f'seed{seed}', 'fp32')
        fp, fp_ckpt = finished_run(fp_work, args.fp32_epochs)
        if fp is None:
            fp, fp_ckpt, _ = train_and_test(TOOLS, FP32_CONFIG, fp_work, root,
                                            args.fp32_epochs, seed)
        fp32.append(fp['accuracy/top1'])
        for name, epochs in runs:
            key = f'{name}@{epochs}'
            run_work = osp.join(work, f'seed{seed}', key)
            shutil.rmtree(run_work, ignore_errors=True)  # one run's logs
            metrics, ckpt, seconds = train_and_test(
                TOOLS, QAT_CONFIG, run_work, root, epochs, seed,
                [f'load_from={fp_ckpt}', *SCHEDULES[name]])
            row = raw[key]
            loop, steps = run_record(run_work, ckpt)
            row['seconds'].append(seconds)
            row['loop'].append(loop)
            row['steps'].append(steps)
            for b in BITS:
                row['top1'][b].append(metrics[f'accuracy/top1@w{b}a{b}'])
            print(f'seed {seed} {key}: {seconds:.0f} s (loop '
                  f'{row["loop"][-1]:.1f} s), ' + ', '.join(
                f'w{b} {row["top1"][b][-1]:.2f}' for b in BITS), flush=True)
    results = dict(seeds=args.seeds, fp32=dict(zip(('mean', 'std'),
                                                   summarize(fp32))),
                   runs={})
    base = raw.get(f'all@{args.qat_epochs}')
    base_seconds, base_loop = (summarize(base['seconds'])[0],
                               summarize(base['loop'])[0]) if base else \
        (None, None)
    lines = [f'QAT on the digits example, {len(args.seeds)} seeds '
             f'({args.seeds}), FP32 {results["fp32"]["mean"]:.2f} ± '
             f'{results["fp32"]["std"]:.2f}; top-1 (%) mean ± std; wall '
             'time of tools/train.py and of its training loop alone (mean; '
             'the rest is start-up and the final validation); steps each '
             f'bit got (seed {args.seeds[0]}); largest drop: the largest of '
             'the every-bit run\'s mean top-1 minus this row\'s over the bits '
             '(goal of issue 28: at most 0.3)', '',
             '| schedule | epochs | QAT s | vs every bit | loop s | vs every '
             'bit | steps w8/w6/w4/w2 | ' + ' | '.join(
                 f'w{b}a{b}' for b in BITS) + ' | largest drop |',
             '|---' * (8 + len(BITS)) + '|']
    for key, row in raw.items():
        name, epochs = key.split('@')
        seconds = summarize(row['seconds'])[0]
        loop = summarize(row['loop'])[0]
        top1 = {b: summarize(row['top1'][b]) for b in BITS}
        results['runs'][key] = dict(
            schedule=name, epochs=int(epochs), options=SCHEDULES[name],
            seconds=row['seconds'], loop_seconds=row['loop'],
            steps=row['steps'],
            top1={str(b): dict(mean=m, std=s, values=row['top1'][b])
                  for b, (m, s) in top1.items()})
        ratio = f'{seconds / base_seconds:.2f}x' if base_seconds else '-'
        loop_ratio = f'{loop / base_loop:.2f}x' if base_loop else '-'
        steps = '/'.join(str(row['steps'][0][b]) for b in BITS)
        lines.append(f'| {name} | {epochs} | {seconds:.0f} | {ratio} | '
                     f'{loop:.1f} | {loop_ratio} | {steps} | ' + ' | '.join(
                         f'{m:.2f} ± {s:.2f}' for m, s in top1.values()) +
                     f' | {largest_drop(base, top1)} |')
    print('\n' + '\n'.join(lines))
    text = (f'# {__doc__.splitlines()[0]}\n\n`python benchmarks/qat_cost.py '
            f'{" ".join(sys.argv[1:])}`\n\n' + '\n'.join(lines) + '\n')
    atomic_write_json(args.out + '.json', results)
    atomic_write(args.out + '.md', lambda f: f.write(text.encode()))
    print(f'saved {args.out}.json and {args.out}.md')


if __name__ == '__main__':
    main()
