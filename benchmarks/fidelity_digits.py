"""Fidelity on the digits example: FP32 vs Double Rounding {8,6,4,2} vs the
floor (right-shift) variant vs unshared per-bit scales vs ALRS off, over
several seeds, in one harness. Each run is the real tools/train.py and
tools/test.py.

    python benchmarks/fidelity_digits.py [--seeds 0 1 2] [--work-dir ...]

Prints mean and spread (sample std) of top-1 per bit, saves
benchmarks/results/fidelity_digits.json and fidelity_digits.png.
"""
import argparse
import json
import os
import os.path as osp
import statistics

from mmdrq.datasets import write_digits
from mmdrq.utils.tool_runs import train_and_test

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
TOOLS = osp.join(ROOT, 'tools')
DIGITS = osp.join(ROOT, 'configs', 'classification', 'digits')
FP32_CONFIG, QAT_CONFIG = (osp.join(DIGITS, f'resnet_digits_{name}.py')
                           for name in ('fp32', 'drq_8642'))

BITS = (8, 6, 4, 2)
VARIANTS = {
    'double_rounding': [],
    'floor': ['model.quantizer.weight_quantizer.variant=floor'],
    'unshared_scales': ['model.quantizer.weight_quantizer.variant=unshared'],
    'alrs_off': ['optim_wrapper.mode=off'],
}


def summarize(values):
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    fp_mean, fp_std = results['fp32']['mean'], results['fp32']['std']
    ax.axhspan(fp_mean - fp_std, fp_mean + fp_std, color='grey', alpha=0.2)
    ax.axhline(fp_mean, color='grey', label='FP32')
    for offset, name in enumerate(VARIANTS):
        rows = results[name]
        xs = [b + (offset - 1.5) * 0.08 for b in BITS]
        ax.errorbar(xs, [rows[str(b)]['mean'] for b in BITS],
                    yerr=[rows[str(b)]['std'] for b in BITS], marker='o',
                    capsize=3, label=name)
    ax.set_xlabel('bit-width (weights and activations)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_xticks(BITS)
    ax.set_title('digits, one-shot {8,6,4,2} QAT, mean ± std over seeds')
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--work-dir', default='work_dirs/fidelity_digits')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=int, default=30)
    parser.add_argument('--qat-epochs', type=int, default=10)
    args = parser.parse_args()
    work, root = osp.abspath(args.work_dir), osp.abspath(args.data_root)
    write_digits(root)
    raw = {'fp32': []}
    raw.update({name: {b: [] for b in BITS} for name in VARIANTS})
    for seed in args.seeds:
        fp, fp_ckpt, _ = train_and_test(
            TOOLS, FP32_CONFIG, osp.join(work, f'seed{seed}', 'fp32'), root,
            args.fp32_epochs, seed)
        raw['fp32'].append(fp['accuracy/top1'])
        for name, options in VARIANTS.items():
            metrics, _, seconds = train_and_test(
                TOOLS, QAT_CONFIG, osp.join(work, f'seed{seed}', name), root,
                args.qat_epochs, seed, [f'load_from={fp_ckpt}', *options])
            for b in BITS:
                raw[name][b].append(metrics[f'accuracy/top1@w{b}a{b}'])
            print(f'seed {seed} {name}: ' + ', '.join(
                f'w{b} {raw[name][b][-1]:.2f}' for b in BITS) +
                f' ({seconds:.0f} s)', flush=True)

    mean, std = summarize(raw['fp32'])
    results = dict(seeds=args.seeds, qat_epochs=args.qat_epochs,
                   fp32=dict(mean=mean, std=std, values=raw['fp32']))
    print(f'\ntop-1 (%) over seeds {args.seeds}: mean ± std\n')
    print('| variant | ' + ' | '.join(f'w{b}a{b}' for b in BITS) + ' |')
    print('|---' * (len(BITS) + 1) + '|')
    print(f'| FP32 | {mean:.2f} ± {std:.2f} |' + ' |' * (len(BITS) - 1))
    for name in VARIANTS:
        results[name] = {}
        cells = []
        for b in BITS:
            m, s = summarize(raw[name][b])
            results[name][str(b)] = dict(mean=m, std=s, values=raw[name][b])
            cells.append(f'{m:.2f} ± {s:.2f}')
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    wins = [b for b in BITS if results['double_rounding'][str(b)]['mean'] >=
            results['floor'][str(b)]['mean']]
    print(f'\nDouble Rounding >= floor (mean) at bits: {wins}')
    out = osp.join(HERE, 'results')
    os.makedirs(out, exist_ok=True)
    with open(osp.join(out, 'fidelity_digits.json'), 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, osp.join(out, 'fidelity_digits.png'))
    print(f'saved {out}/fidelity_digits.json and fidelity_digits.png')


if __name__ == '__main__':
    main()
