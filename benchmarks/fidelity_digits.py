"""Fidelity on the digits example: FP32 vs Double Rounding {8,6,4,2} vs the
floor (right-shift) variant vs unshared per-bit scales vs ALRS off vs the
other scale-gradient residual, over several seeds, in one harness. Each run
is the real tools/train.py and tools/test.py.

    python benchmarks/fidelity_digits.py [--seeds 0 1 2] [--variants ...]

Prints mean and spread (sample std) of top-1 per bit, saves
benchmarks/results/fidelity_digits.json and fidelity_digits.png (``--out``). With
``--variants``, only those QAT variants run (FP32 always does: they start
from it); the other variants' rows are kept from the JSON if it holds the
same seeds, epochs and FP32 results, and dropped otherwise;
``--reuse-fp32`` takes the FP32 runs already in ``--work-dir`` (so a later
run of other variants starts from the same checkpoints).
"""
import argparse
import json
import os
import os.path as osp
import statistics

from mmdrq.datasets import write_digits
from mmdrq.utils import atomic_write_json
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
    'double_rounded_residual': [
        'model.quantizer.weight_quantizer.scale_grad_residual='
        'double_rounded'],
    # each lower bit's step s * 2**(h-l+k), k of least weight error
    'step_shift_mse': ['model.quantizer.weight_quantizer.step_shift=mse'],
    # every bit also learns the FP32 model's logits ({fp32}: the seed's
    # FP32 checkpoint)
    'fp_distill': ['model.fp_distill.checkpoint={fp32}'],
}


def summarize(values):
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, spread


def finished_run(work, epochs):
    """(metrics, checkpoint) of a run ``train_and_test`` finished in
    ``work``, or (None, None)."""
    metrics, ckpt = osp.join(work, 'test_metrics.json'), \
        osp.join(work, f'epoch_{epochs}.pth')
    if not (osp.exists(metrics) and osp.exists(ckpt)):
        return None, None
    with open(metrics) as f:
        return json.load(f), ckpt


def kept_rows(json_path, results, variants) -> dict:
    """Rows of the variants not run now, from the last JSON, if it was made
    with the same seeds, epochs and FP32 results (so the same FP32
    checkpoints); each keeps its own ``options``."""
    if not osp.exists(json_path):
        return {}
    with open(json_path) as f:
        last = json.load(f)
    same = all(last.get(key) == results[key] for key in ('seeds',
                                                          'qat_epochs'))
    same = same and last.get('fp32', {}).get('values') == \
        results['fp32']['values']
    if not same:
        print(f'{json_path}: other seeds, epochs or FP32 results; '
              'its other rows are dropped')
        return {}
    return {name: dict(last[name], options=last[name].get(
        'options', VARIANTS[name])) for name in VARIANTS
            if name in last and name not in variants}


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    fp_mean, fp_std = results['fp32']['mean'], results['fp32']['std']
    ax.axhspan(fp_mean - fp_std, fp_mean + fp_std, color='grey', alpha=0.2)
    ax.axhline(fp_mean, color='grey', label='FP32')
    names = [name for name in VARIANTS if name in results]
    for offset, name in enumerate(names):
        rows = results[name]
        xs = [b + (offset - (len(names) - 1) / 2) * 0.08 for b in BITS]
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
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS),
                        default=list(VARIANTS),
                        help='QAT variants to run (default: all)')
    parser.add_argument('--reuse-fp32', action='store_true',
                        help='use the FP32 runs already in --work-dir')
    parser.add_argument('--out', default=osp.join(HERE, 'results',
                                                  'fidelity_digits'),
                        help='writes OUT.json and OUT.png')
    args = parser.parse_args()
    work, root = osp.abspath(args.work_dir), osp.abspath(args.data_root)
    write_digits(root)
    variants = {name: VARIANTS[name] for name in args.variants}
    raw = {'fp32': []}
    raw.update({name: {b: [] for b in BITS} for name in variants})
    for seed in args.seeds:
        fp_work = osp.join(work, f'seed{seed}', 'fp32')
        fp, fp_ckpt = finished_run(fp_work, args.fp32_epochs) \
            if args.reuse_fp32 else (None, None)
        if fp is None:
            fp, fp_ckpt, _ = train_and_test(TOOLS, FP32_CONFIG, fp_work, root,
                                            args.fp32_epochs, seed)
        raw['fp32'].append(fp['accuracy/top1'])
        for name, options in variants.items():
            metrics, _, seconds = train_and_test(
                TOOLS, QAT_CONFIG, osp.join(work, f'seed{seed}', name), root,
                args.qat_epochs, seed, [f'load_from={fp_ckpt}', *(
                    o.replace('{fp32}', fp_ckpt) for o in options)])
            for b in BITS:
                raw[name][b].append(metrics[f'accuracy/top1@w{b}a{b}'])
            print(f'seed {seed} {name}: ' + ', '.join(
                f'w{b} {raw[name][b][-1]:.2f}' for b in BITS) +
                f' ({seconds:.0f} s)', flush=True)

    mean, std = summarize(raw['fp32'])
    results = dict(seeds=args.seeds, qat_epochs=args.qat_epochs,
                   fp32=dict(mean=mean, std=std, values=raw['fp32']))
    json_path = args.out + '.json'
    kept = kept_rows(json_path, results, variants)
    for name in VARIANTS:
        if name in variants:
            results[name] = {str(b): dict(zip(
                ('mean', 'std'), summarize(raw[name][b])),
                values=raw[name][b]) for b in BITS}
            results[name]['options'] = variants[name]
        elif name in kept:
            results[name] = kept[name]
    print(f'\ntop-1 (%) over seeds {args.seeds}: mean ± std\n')
    print('| variant | ' + ' | '.join(f'w{b}a{b}' for b in BITS) + ' |')
    print('|---' * (len(BITS) + 1) + '|')
    print(f'| FP32 | {mean:.2f} ± {std:.2f} |' + ' |' * (len(BITS) - 1))
    for name in VARIANTS:
        if name not in results:
            continue
        cells = [f'{results[name][str(b)]["mean"]:.2f} ± '
                 f'{results[name][str(b)]["std"]:.2f}' for b in BITS]
        note = '' if name in variants else ' (kept from the last run)'
        print(f'| {name}{note} | ' + ' | '.join(cells) + ' |')
    if 'double_rounding' in results and 'floor' in results:
        wins = [b for b in BITS if results['double_rounding'][str(b)]['mean']
                >= results['floor'][str(b)]['mean']]
        print(f'\nDouble Rounding >= floor (mean) at bits: {wins}')
    os.makedirs(osp.dirname(osp.abspath(json_path)), exist_ok=True)
    atomic_write_json(json_path, results)
    plot(results, args.out + '.png')
    print(f'saved {json_path} and {args.out}.png')


if __name__ == '__main__':
    main()
