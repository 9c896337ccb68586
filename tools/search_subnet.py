"""Search mixed-precision SubNets under a budget and evaluate them.

    python tools/search_subnet.py CONFIG CKPT \
        [--kind avg_bits|bitops|size] [--budget-mode max|exact] \
        [--budgets 3 4 5 | --range 2.5 7 --steps 10] \
        [--objective measured|perturbation|trace_bits] \
        [--traces traces.json] \
        [--calibration-samples 256 --seed 0 | --increases search.json] \
        [--input-shape 1 3 224 224] [--work-dir DIR] \
        [--metric accuracy/top1] [--no-eval] [--bn-calibration N]
        [--cfg-options k=v ...]

For each budget an integer linear program (scipy.optimize.milp) picks one
bit per quantized layer at a cost at most the budget (``--budget-mode max``)
or equal to it (``exact``, the paper's: the nearest cost a SubNet has),
minimising the sum of each chosen layer's loss increase measured alone at
its bit on the first ``--calibration-samples`` training images (the default,
``--objective measured``; no traces; ``--increases`` reuses an earlier
search's), or, with tools/hessian.py's traces per parameter, minimising
sum(trace_l * ||Q_b(W_l) - W_l||^2) with the checkpoint's own quantized
weights (HAWQ-V2, ``--objective perturbation``) or maximising
sum(trace_l * bits_l) (the paper's, ``--objective trace_bits``). A budget
outside the feasible range is an error that gives the range. Each SubNet is
written as ``subnet_<kind>_<budget>.json`` (``tools/test.py --subnets`` and
``tools/export_int.py --subnet`` take it). Unless --no-eval, every SubNet
and every uniform bit-width is evaluated in one MultiBitTestLoop run,
without retraining; the results go to ``search.json`` and a Pareto plot
``pareto_<kind>.png`` (metric vs budget, uniform bits alongside).
``search.json`` is written once before the evaluation too, so a failed
evaluation keeps the search and its measured increases; a ``--metric`` the
evaluator does not give stops the run after the first setting.
"""
import argparse
import os.path as osp

import numpy as np
import torch
from mmengine.runner import Runner, set_random_seed

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.quantization import model_bits
from mmdrq.quantization.bitwidths import bit_name, split_tag, tag
from mmdrq.search.calibration import FirstSamples
from mmdrq.search.counting import (BUDGET_KINDS, fp_bytes, layer_costs,
                                   subnet_cost)
from mmdrq.search.hessian import load_traces
from mmdrq.search.ilp import (BUDGET_MODES, OBJECTIVES, check_budgets,
                              feasible_range, pareto_sweep)
from mmdrq.search.perturbation import weight_perturbations
from mmdrq.search.sensitivity import (load_increases, loss_increases,
                                      monotone)
from mmdrq.search.subnet import save_subnet
from mmdrq.apis import load_trained
from mmdrq.engine.loops import MissingMetricError
from mmdrq.tools_common import (add_cfg_options, check_input_channels,
                                configure_test, prepare_launch)
from mmdrq.utils import atomic_write_json


def parse_args():
    parser = argparse.ArgumentParser(description='Search mixed-precision '
                                     'SubNets')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--traces', help='tools/hessian.py\'s traces '
                        '(every objective but measured)')
    parser.add_argument('--kind', default='avg_bits', choices=BUDGET_KINDS)
    parser.add_argument(
        '--budget-mode', default='max', choices=BUDGET_MODES,
        help="max: cost <= budget. exact (the paper's equality): the cost "
        'equals the budget or, where no SubNet has that cost, is the '
        'nearest cost a SubNet has (the lower of two equally near); costs '
        'compare exactly (sums of bits, BitOps, bytes). For bitops and '
        'size nearly every SubNet has its own cost, so exact fixes the '
        'SubNet almost alone: use max there')
    parser.add_argument(
        '--objective', default='measured', choices=OBJECTIVES,
        help='measured (default): minimise the sum of the loss increases '
        'measured per layer and bit (no traces; at or above perturbation '
        'at 27 of 30 budgets on digits, FCOS and FCN, '
        'docs/mixed_precision.md); perturbation: minimise sum(trace * '
        'weight error); trace_bits: the paper\'s, maximise sum(trace * '
        'bits)')
    parser.add_argument(
        '--calibration-samples', type=int, metavar='N',
        help='training images the measured objective\'s losses are '
        'taken on (whole batches; default 256)')
    parser.add_argument(
        '--seed', type=int,
        help='seed of the calibration images\' order and augmentations, '
        'so that a search repeats (measured objective; default 0)')
    parser.add_argument(
        '--increases', metavar='SEARCH_JSON',
        help='measured objective: the loss increases of an earlier '
        'measured search of this checkpoint (its search.json), instead of '
        'measuring again, e.g. to search another budget kind')
    budgets = parser.add_mutually_exclusive_group()
    budgets.add_argument('--budgets', type=float, nargs='+')
    budgets.add_argument('--range', type=float, nargs=2,
                         metavar=('LO', 'HI'),
                         help='--steps budgets from LO to HI (default: the '
                         'feasible range)')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--input-shape', type=int, nargs=4,
                        default=[1, 3, 224, 224], metavar=('N', 'C', 'H', 'W'),
                        help='input of the BitOps count (per image)')
    parser.add_argument('--work-dir', default='work_dirs/search')
    parser.add_argument('--metric', help='metric to plot (default: first)')
    parser.add_argument('--no-eval', action='store_true')
    parser.add_argument('--bn-calibration', type=int, metavar='N',
                        help='before each SubNet and uniform bit is '
                        'evaluated, re-estimate every BN\'s statistics on N '
                        'training batches at that setting (the test loop\'s '
                        'bn_calibration)')
    add_cfg_options(parser)
    args = parser.parse_args()
    measuring = args.objective == 'measured' and args.increases is None
    for flag, value in (('--calibration-samples', args.calibration_samples),
                        ('--seed', args.seed)):
        if value is not None and not measuring:
            parser.error(f'{flag}: only the measured objective measuring '
                         'afresh takes it, not ' + (
                             '--increases' if args.increases else
                             f'--objective {args.objective}'))
    if args.objective == 'measured':
        if args.traces is not None:
            parser.error('--traces: the measured objective (the default) '
                         'takes none, it measures each layer\'s loss '
                         'increase; pass --objective perturbation or '
                         'trace_bits to search with traces')
        if args.calibration_samples is None:
            args.calibration_samples = 256
        if args.seed is None:
            args.seed = 0
        if args.calibration_samples < 1:
            parser.error(f'--calibration-samples must be at least 1, got '
                         f'{args.calibration_samples}')
    elif args.traces is None:
        parser.error(f'--objective {args.objective} needs --traces (from '
                     'tools/hessian.py)')
    elif args.increases is not None:
        parser.error(f'--increases: only the measured objective takes '
                     f'them, not --objective {args.objective}')
    if args.metric is not None and args.no_eval:
        parser.error(f'--metric {args.metric}: nothing is evaluated with '
                     '--no-eval')
    if args.steps < 1:
        parser.error(f'--steps must be at least 1, got {args.steps}')
    if args.bn_calibration is not None and args.bn_calibration < 1:
        parser.error(f'--bn-calibration must be at least 1, got '
                     f'{args.bn_calibration}')
    if min(args.input_shape) < 1:
        parser.error(f'--input-shape must be 4 positive sizes (N C H W), got '
                     f'{" ".join(map(str, args.input_shape))}')
    return args


def measures(layer_bits, costs, fp):
    return {kind: subnet_cost(kind, layer_bits, costs, fp)
            for kind in BUDGET_KINDS}


def main():
    args = parse_args()
    cfg, model, arch = load_trained(args.config, args.checkpoint,
                                    args.cfg_options)
    shape = tuple(args.input_shape)
    check_input_channels(arch, shape)
    bits = model_bits(arch)
    arch.eval()
    costs = layer_costs(arch, lambda m: m(torch.zeros(shape), mode='tensor'))
    fp = fp_bytes(arch)
    lo, hi = feasible_range(costs, bits, args.kind, fp_bytes=fp)
    budgets = args.budgets or [float(b) for b in np.linspace(
        *(args.range or (lo, hi)), args.steps)]
    check_budgets(costs, bits, args.kind, budgets, fp)  # before measuring
    if args.objective == 'measured':
        # the perturbation objective with measured increases, traces 1
        if args.increases:
            measured = load_increases(args.increases, args.checkpoint, model)
        else:
            measured = measure(cfg, model, args.calibration_samples,
                               args.seed)
        perturbations = monotone(measured)
        traces = dict.fromkeys(perturbations, 1.0)
    else:
        traces = {n: v['trace_per_param']
                  for n, v in load_traces(args.traces, model).items()}
        perturbations = weight_perturbations(arch) \
            if args.objective == 'perturbation' else None
    rows = pareto_sweep(traces, costs, bits, args.kind, budgets, fp_bytes=fp,
                        perturbations=perturbations,
                        budget_mode=args.budget_mode)
    subnets, files = [], []
    for row in rows:
        name = f'subnet_{args.kind}_{row["budget"]:g}'
        entry = dict(name=name, budget_kind=args.kind,
                     budget_mode=args.budget_mode, budget=row['budget'],
                     layer_bits=row['layer_bits'],
                     objective_kind=args.objective,
                     objective=row['objective'],
                     **measures(row['layer_bits'], costs, fp))
        path = osp.join(args.work_dir, name + '.json')
        save_subnet(path, model=arch, **entry)
        subnets.append(entry)
        files.append(path)
        print(f'{name}: avg bits {entry["avg_bits"]:.2f}, BitOps '
              f'{entry["bitops"]:.3e}, size {entry["size"]:,.0f} B')
    uniform = [dict(name=bit_name(b), **measures(
        {n: b for n in costs}, costs, fp)) for b in bits]
    results = dict(kind=args.kind, budget_mode=args.budget_mode,
                   checkpoint=osp.realpath(args.checkpoint),
                   feasible_range=[lo, hi], subnets=subnets, uniform=uniform)
    if args.objective == 'measured':  # what the search used, and the raw
        results['loss_increases'] = perturbations
        results['measured_loss_increases'] = measured
    out = osp.join(args.work_dir, 'search.json')
    # written before the evaluation too: if it fails, the search (and the
    # measured increases, for --increases) is kept
    atomic_write_json(out, results)
    if not args.no_eval:
        results['metrics'] = evaluate(cfg, args, files)
        attach_metrics(results, args.metric)
        plot(results, osp.join(args.work_dir, f'pareto_{args.kind}.png'))
        atomic_write_json(out, results)
    print(f'wrote {out}')


def measure(cfg, model, samples, seed):
    """Each layer's loss increase at each bit on the first ``samples``
    training images (on CUDA if there is one: forwards per layer and bit).
    The global generators are seeded too: the training pipeline's random
    augmentations draw from them, and the same command must find the same
    SubNets."""
    set_random_seed(seed)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=seed)
    if torch.cuda.is_available():
        model.cuda()
    try:
        return loss_increases(model, FirstSamples(loader, samples))
    finally:
        model.cpu()


def evaluate(cfg, args, files):
    """One test run over every uniform bit and every SubNet file."""
    cfg.work_dir = args.work_dir
    options = {} if args.bn_calibration is None else dict(
        bn_calibration=dict(batches=args.bn_calibration))
    if args.metric is not None:  # a misspelt one stops after one setting
        options['required_metric'] = args.metric
    configure_test(cfg, args.checkpoint, 'all', files, **options)
    prepare_launch(cfg)
    try:
        metrics = Runner.from_cfg(cfg).test()
    except MissingMetricError as e:
        raise MissingMetricError('--metric', e.name, e.available) from None
    return {k: float(v) for k, v in metrics.items()}


def attach_metrics(results, metric):
    """Each SubNet's and uniform bit's value of ``metric`` (the
    evaluation's first metric if None; the test loop has checked a given
    one)."""
    metric = metric or sorted({split_tag(k)[0] for k in results['metrics']})[0]
    results['metric'] = metric
    for entry in results['subnets'] + results['uniform']:
        entry[metric] = results['metrics'].get(metric + tag(entry['name']))


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
