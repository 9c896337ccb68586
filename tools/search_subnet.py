"""Search mixed-precision SubNets under a budget and evaluate them.

    python tools/search_subnet.py CONFIG CKPT --traces traces.json \
        [--kind avg_bits|bitops|size] [--budgets 3 4 5 | --range 2.5 7 \
        --steps 10] [--objective trace_bits|perturbation] \
        [--input-shape 1 3 224 224] [--work-dir DIR] \
        [--metric accuracy/top1] [--no-eval] [--cfg-options k=v ...]

For each budget an integer linear program (scipy.optimize.milp) picks one
bit per quantized layer under the budget, maximising sum(trace_l * bits_l)
(the paper; Hessian traces per parameter from tools/hessian.py) or, with
``--objective perturbation``, minimising sum(trace_l * ||Q_b(W_l) - W_l||^2)
with the checkpoint's own quantized weights (HAWQ-V2). Each SubNet is written as
``subnet_<kind>_<budget>.json`` (``tools/test.py --subnets`` and
``tools/export_int.py --subnet`` take it). Unless --no-eval, every SubNet and
every uniform bit-width is evaluated in one MultiBitTestLoop run, without
retraining; the results go to ``search.json`` and a Pareto plot
``pareto_<kind>.png`` (metric vs budget, uniform bits alongside).
"""
import argparse
import json
import os
import os.path as osp

import numpy as np
import torch
from mmengine.config import DictAction
from mmengine.runner import Runner

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.quantization import model_bits
from mmdrq.search.counting import (average_bits, bitops, fp_bytes,
                                   layer_costs, model_size_bytes)
from mmdrq.search.hessian import load_traces
from mmdrq.search.ilp import (BUDGET_KINDS, OBJECTIVES, feasible_range,
                              layer_scores, search_subnet)
from mmdrq.search.perturbation import weight_perturbations
from mmdrq.tools_common import load_trained, prepare_launch


def parse_args():
    parser = argparse.ArgumentParser(description='Search mixed-precision '
                                     'SubNets')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--traces', required=True)
    parser.add_argument('--kind', default='avg_bits', choices=BUDGET_KINDS)
    parser.add_argument('--objective', default='trace_bits',
                        choices=OBJECTIVES)
    parser.add_argument('--budgets', type=float, nargs='+')
    parser.add_argument('--range', type=float, nargs=2, metavar=('LO', 'HI'))
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--input-shape', type=int, nargs='+',
                        default=[1, 3, 224, 224],
                        help='input of the BitOps count (per image)')
    parser.add_argument('--work-dir', default='work_dirs/search')
    parser.add_argument('--metric', help='metric to plot (default: first)')
    parser.add_argument('--no-eval', action='store_true')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def measures(layer_bits, costs, fp):
    return dict(avg_bits=average_bits(layer_bits),
                bitops=bitops(layer_bits, costs),
                size=model_size_bytes(layer_bits, costs, fp))


def main():
    args = parse_args()
    cfg, model, arch = load_trained(args.config, args.checkpoint,
                                    args.cfg_options)
    bits = model_bits(arch)
    traces = {n: v['trace_per_param']
              for n, v in load_traces(args.traces, model).items()}
    shape = tuple(args.input_shape)
    arch.eval()
    costs = layer_costs(arch, lambda m: m(torch.zeros(shape), mode='tensor'))
    fp = fp_bytes(arch)
    perturbations = weight_perturbations(arch) \
        if args.objective == 'perturbation' else None
    scores = layer_scores(traces, bits, perturbations)
    lo, hi = feasible_range(costs, bits, args.kind, fp_bytes=fp)
    if args.budgets:
        budgets = args.budgets
    else:
        start, stop = args.range or (lo, hi)
        budgets = [float(b) for b in np.linspace(start, stop, args.steps)]
    os.makedirs(args.work_dir, exist_ok=True)
    subnets, files = [], []
    for budget in budgets:
        layer_bits = search_subnet(traces, costs, bits, args.kind, budget,
                                   fp_bytes=fp, perturbations=perturbations)
        name = f'subnet_{args.kind}_{budget:g}'
        entry = dict(name=name, budget_kind=args.kind, budget=budget,
                     layer_bits=layer_bits, objective_kind=args.objective,
                     objective=sum(scores[n][b]
                                   for n, b in layer_bits.items()),
                     **measures(layer_bits, costs, fp))
        path = osp.join(args.work_dir, name + '.json')
        with open(path, 'w') as f:
            json.dump(entry, f, indent=1)
        subnets.append(entry)
        files.append(path)
        print(f'{name}: avg bits {entry["avg_bits"]:.2f}, BitOps '
              f'{entry["bitops"]:.3e}, size {entry["size"]:,.0f} B')
    uniform = [dict(name=f'w{b}a{b}', **measures(
        {n: b for n in costs}, costs, fp)) for b in bits]
    results = dict(kind=args.kind, feasible_range=[lo, hi],
                   subnets=subnets, uniform=uniform)
    if not args.no_eval:
        results['metrics'] = evaluate(cfg, args, files)
        attach_metrics(results, args.metric)
        plot(results, osp.join(args.work_dir, f'pareto_{args.kind}.png'))
    with open(osp.join(args.work_dir, 'search.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print(f'wrote {args.work_dir}/search.json')


def evaluate(cfg, args, files):
    """One test run over every uniform bit and every SubNet file."""
    cfg.load_from = args.checkpoint
    cfg.work_dir = args.work_dir
    cfg.test_cfg = dict(type='mmdrq.MultiBitTestLoop', bits='all',
                        subnets=files)
    prepare_launch(cfg)
    metrics = Runner.from_cfg(cfg).test()
    return {k: float(v) for k, v in metrics.items()}


def attach_metrics(results, metric):
    names = sorted({k.rsplit('@', 1)[0] for k in results['metrics']})
    metric = metric or names[0]
    results['metric'] = metric
    for entry in results['subnets'] + results['uniform']:
        entry[metric] = results['metrics'].get(f'{metric}@{entry["name"]}')


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    kind, metric = results['kind'], results['metric']
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in (('subnets', 'o-', 'searched SubNets'),
                              ('uniform', 's', 'uniform bits')):
        points = sorted((e[kind], e[metric]) for e in results[key])
        ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel(kind)
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    main()
