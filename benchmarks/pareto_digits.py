"""Mixed precision on the digits example: Pareto fronts of SubNets searched
in a HASB SuperNet (with the paper's trace * bits objective and with
HAWQ-V2's trace * weight perturbation) vs a uniformly switched SuperNet,
with the uniform-bit models alongside, over average bit-widths 2.5 to 7. Every step is a tool:
train.py (FP32, multi-precision, two SuperNets), hessian.py,
search_subnet.py (ILP + evaluation without retraining).

    python benchmarks/pareto_digits.py [--work-dir ...] [--supernet-epochs 5]

Prints a table and saves benchmarks/results/pareto_digits.json and .png.
"""
import argparse
import json
import os
import os.path as osp

from mmdrq.datasets import write_digits
from mmdrq.utils.tool_runs import data_options, run_tool, train_and_test

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(HERE)
TOOLS = osp.join(ROOT, 'tools')
CONFIGS = osp.join(ROOT, 'configs', 'classification', 'digits')
FP32_CONFIG = osp.join(CONFIGS, 'resnet_digits_fp32.py')
QAT_CONFIG = osp.join(CONFIGS, 'resnet_digits_drq_8642.py')
MP_CONFIG = osp.join(CONFIGS, 'resnet_digits_drq-mp_8642.py')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/pareto_digits')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=int, default=30)
    parser.add_argument('--qat-epochs', type=int, default=10)
    parser.add_argument('--supernet-epochs', type=int, default=5)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    work, root = osp.abspath(args.work_dir), osp.abspath(args.data_root)
    write_digits(root)
    _, fp_ckpt, _ = train_and_test(TOOLS, FP32_CONFIG,
                                   osp.join(work, 'fp32'), root,
                                   args.fp32_epochs, args.seed)
    multi, mp_ckpt, _ = train_and_test(
        TOOLS, QAT_CONFIG, osp.join(work, 'multi'), root, args.qat_epochs,
        args.seed, [f'load_from={fp_ckpt}'])
    traces = osp.join(work, 'traces.json')
    run_tool([osp.join(TOOLS, 'hessian.py'), QAT_CONFIG, mp_ckpt, '--out',
              traces, '--num-samples', '512', '--cfg-options',
              *data_options(root)], osp.join(work, 'hessian.log'))
    fronts = {}
    for name, hook in (('hasb', [f'custom_hooks.0.traces={traces}']),
                       ('uniform', ['custom_hooks.0.uniform=True',
                                    'custom_hooks.0.traces=None'])):
        _, ckpt, _ = train_and_test(
            TOOLS, MP_CONFIG, osp.join(work, name), root, args.supernet_epochs,
            args.seed, [f'load_from={mp_ckpt}', *hook])
        objectives = ('trace_bits', 'perturbation') if name == 'hasb' \
            else ('trace_bits', )
        for objective in objectives:
            front = name if objective == 'trace_bits' \
                else f'{name}_{objective}'
            out = osp.join(work, front, 'search')
            run_tool([osp.join(TOOLS, 'search_subnet.py'), MP_CONFIG, ckpt,
                      '--traces', traces, '--kind', 'avg_bits', '--range',
                      '2.5', '7', '--steps', '10', '--objective', objective,
                      '--input-shape', '1', '3', '16', '16', '--work-dir',
                      out, '--cfg-options', *data_options(root)],
                     osp.join(work, f'search_{front}.log'))
            with open(osp.join(out, 'search.json')) as f:
                fronts[front] = json.load(f)
    report(fronts, multi)


def report(fronts, multi):
    metric = fronts['hasb']['metric']
    print(f'\n{metric} (%) of searched SubNets by average-bit budget\n')
    print('| budget | HASB SuperNet | HASB SuperNet, perturbation '
          'objective | uniform-switching SuperNet |')
    print('|---|---|---|---|')
    for hasb, hawq, uni in zip(fronts['hasb']['subnets'],
                               fronts['hasb_perturbation']['subnets'],
                               fronts['uniform']['subnets']):
        print(f'| {hasb["budget"]:.2f} | ' + ' | '.join(
            f'{e[metric]:.2f} (avg {e["avg_bits"]:.2f})'
            for e in (hasb, hawq, uni)) + ' |')
    print('\nuniform bits: ' + ', '.join(
        f'{u["name"]} {u[metric]:.2f} (multi-precision model '
        f'{multi[metric + "@" + u["name"]]:.2f})'
        for u in fronts['hasb']['uniform']))
    out = osp.join(HERE, 'results')
    os.makedirs(out, exist_ok=True)
    with open(osp.join(out, 'pareto_digits.json'), 'w') as f:
        json.dump(dict(fronts=fronts, multi_precision=multi), f, indent=1)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (('hasb', 'o-'), ('hasb_perturbation', 'd-'),
                        ('uniform', 's--')):
        pts = sorted((e['avg_bits'], e[metric])
                     for e in fronts[name]['subnets'])
        ax.plot(*zip(*pts), style, label=f'{name} SuperNet SubNets')
    pts = sorted((e['avg_bits'], e[metric])
                 for e in fronts['hasb']['uniform'])
    ax.plot(*zip(*pts), 'k^', label='uniform bits (HASB SuperNet)')
    ax.set_xlabel('average bit-width')
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    ax.set_title('digits: mixed-precision Pareto fronts')
    fig.tight_layout()
    fig.savefig(osp.join(out, 'pareto_digits.png'), dpi=120)
    print(f'saved {out}/pareto_digits.json and pareto_digits.png')


if __name__ == '__main__':
    main()
