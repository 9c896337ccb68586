"""Per-bit validation loss of the character Llama (configs/language): the
model's own FP32, one-shot {8,6,4,2} Double Rounding QAT, and the same QAT
with separately rounded weights (one scale per bit, ``variant=unshared``),
with ALRS off, with 8-bit activations (``llama_char_drq-8642_a8.py``), and
with the token embeddings and the LM head quantized too, over seeds;
every run through tools/train.py and tools/test.py as a user runs them.

    python benchmarks/lm_bits.py [--corpus shakespeare] [--seeds 0 1 2]
        [--rows drq unshared alrs_off a8 emb_head] [--lanes 2] [--report]

Per seed the FP32 config trains first (its seed), then each QAT row starts
from that checkpoint. ``--lanes`` runs that many at once, each on one
thread (two lanes on two cores take about the time of one). Runs are
reused from ``work_dirs/lm_bits`` when their settings match. Writes
``benchmarks/results/lm_bits.{md,json}``.
"""
import argparse
import json
import os
import os.path as osp
import statistics
from concurrent.futures import ThreadPoolExecutor

from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import data_options, recorded_run, run_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
CONFIGS = osp.join(ROOT, 'configs', 'language')
FP32 = osp.join(CONFIGS, 'llama_char_fp32.py')
QAT = osp.join(CONFIGS, 'llama_char_drq-8642.py')
BITS = (8, 6, 4, 2)
# row: (QAT config, options)
ROWS = {
    'drq': (QAT, []),
    'unshared': (QAT, ['model.quantizer.weight_quantizer.variant=unshared']),
    'alrs_off': (QAT, ['optim_wrapper.mode=off']),
    'a8': (osp.join(CONFIGS, 'llama_char_drq-8642_a8.py'), []),
    'emb_head': (QAT, ['model.quantizer.embeddings=True',
                       'model.quantizer.skip=[]']),
}
LABELS = {'drq': 'Double Rounding (config)',
          'unshared': 'separately rounded (a scale per bit)',
          'alrs_off': 'Double Rounding, ALRS off',
          'a8': 'Double Rounding, 8-bit activations (a8 config)',
          'emb_head': 'Double Rounding, embeddings and LM head quantized'}


def run(config, work, seed, options):
    return recorded_run(TOOLS, config, work, seed, options, ROOT)


def run_all(seeds, rows, root, work_dir, lanes):
    """Every seed's FP32 run, then each row's QAT run from it (row by row,
    so the first rows get every seed first), ``lanes`` at a time; a QAT
    run waits for its FP32 one, which was queued before it."""
    data = data_options(root)
    with ThreadPoolExecutor(lanes) as pool:
        fp = {seed: pool.submit(run, FP32, osp.join(
            work_dir, f'fp32_seed{seed}'), seed, data) for seed in seeds}

        def qat(row, seed):
            start = f'load_from={fp[seed].result()["checkpoint"]}'
            config, options = ROWS[row]
            return run(config, osp.join(work_dir, f'{row}_seed{seed}'), seed,
                       data + [start] + options)
        jobs = {(row, seed): pool.submit(qat, row, seed)
                for row in rows for seed in seeds}
        for job in jobs.values():
            job.result()


def collect(work_dir, seeds, rows) -> dict:
    """The finished runs' records under ``work_dir``, by seed and row (a
    seed without its FP32 run is left out)."""
    found = {}
    for seed in seeds:
        runs = {}
        for row in ['fp32'] + list(rows):
            path = osp.join(work_dir, f'{row}_seed{seed}', 'run.json')
            if osp.isfile(path):
                with open(path) as f:
                    runs[row] = json.load(f)
        if 'fp32' in runs:
            found[seed] = runs
    return found


def losses(record, row):
    """Validation loss per bit (FP32: one value, under every bit)."""
    metrics = record['metrics']
    if row == 'fp32':
        return {'FP32': metrics['lm/loss']}
    return {f'w{b}': metrics[f'lm/loss@w{b}a{b}'] for b in BITS}


def summary(results: dict, rows) -> dict:
    """Per row and column: values by seed, mean, sample std; and each
    bit's difference from the same seed's FP32."""
    table = {}
    for row in ['fp32'] + list(rows):
        per_seed = {seed: losses(runs[row], row)
                    for seed, runs in results.items() if row in runs}
        if not per_seed:
            continue
        cells = {}
        for column in next(iter(per_seed.values())):
            values = {s: v[column] for s, v in per_seed.items()}
            gaps = {s: v[column] - losses(results[s]['fp32'], 'fp32')['FP32']
                    for s, v in per_seed.items()}
            cells[column] = dict(values=values, mean=_mean(values),
                                 std=_std(values), gap=_mean(gaps),
                                 gap_std=_std(gaps))
        minutes = [runs[row]['seconds'] / 60 for runs in results.values()
                   if row in runs]
        table[row] = dict(cells=cells, seeds=sorted(per_seed),
                          minutes=_mean(dict(enumerate(minutes))))
    return table


def _mean(values: dict) -> float:
    return statistics.mean(values.values())


def _std(values: dict) -> float:
    return statistics.stdev(values.values()) if len(values) > 1 else 0.0


GOALS = {'w8': 0.01, 'w6': 0.02, 'w4': 0.05, 'w2': 0.25}


def markdown(table: dict, corpus: str) -> str:
    lines = [f'Validation loss (nats per character, {corpus} corpus): mean '
             '± sample std over seeds; below it the difference from the '
             "same seed's FP32 (goal: w8 +0.01, w6 +0.02, w4 +0.05, w2 "
             '+0.25).', '',
             '| row | seeds | train min | FP32 | w8 | w6 | w4 | w2 |',
             '|---|---|---|---|---|---|---|---|']
    for row, entry in table.items():
        cells = entry['cells']
        text = []
        for column in ('FP32', 'w8', 'w6', 'w4', 'w2'):
            if column not in cells:
                text.append('')
                continue
            c = cells[column]
            value = f'{c["mean"]:.4f} ± {c["std"]:.4f}'
            if column != 'FP32':
                met = 'met' if c['gap'] <= GOALS[column] else 'not met'
                value += f'<br>{c["gap"]:+.4f} ± {c["gap_std"]:.4f} ({met})'
            text.append(value)
        label = LABELS.get(row, 'FP32')
        lines.append(f'| {label} | {", ".join(map(str, entry["seeds"]))} | '
                     f'{entry["minutes"]:.1f} | ' + ' | '.join(text) + ' |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--corpus', default='shakespeare',
                        choices=['shakespeare', 'pydoc'])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--rows', nargs='+', default=list(ROWS),
                        choices=list(ROWS))
    parser.add_argument('--lanes', type=int, default=2)
    parser.add_argument('--report', action='store_true',
                        help='only tabulate the runs finished so far')
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs',
                                                       'lm_bits'))
    args = parser.parse_args()
    root = osp.join(ROOT, 'data', f'{args.corpus}_chars')
    if not osp.isfile(osp.join(root, 'vocab.json')):
        run_tool([osp.join(TOOLS, 'prepare_text.py'), '--corpus',
                  args.corpus, '--root', root],
                 osp.join(ROOT, 'data', f'prepare_{args.corpus}.log'))
    if args.lanes > 1:  # each run on one thread
        os.environ['OMP_NUM_THREADS'] = '1'
    work_dir = osp.join(args.work_dir, args.corpus)
    if not args.report:
        run_all(args.seeds, args.rows, root, work_dir, args.lanes)
    table = summary(collect(work_dir, args.seeds, args.rows), args.rows)
    out = osp.join(ROOT, 'benchmarks', 'results', 'lm_bits')
    atomic_write_json(out + '.json', dict(corpus=args.corpus, table=table))
    text = markdown(table, args.corpus)
    atomic_write(out + '.md', lambda f: f.write(text.encode()))
    print(text)


if __name__ == '__main__':
    main()
