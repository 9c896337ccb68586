"""Mixed precision on the digits example: Pareto fronts of SubNets searched
in a HASB SuperNet (with the paper's trace * bits objective, with HAWQ-V2's
trace * weight perturbation and with the loss increases measured per layer
and bit) and in a uniformly switched SuperNet,
each evaluated as stored and with every BN re-calibrated per setting
(``--bn-calibration``), and the measured front's SubNets each fine-tuned
alone (``--finetune-epochs``, SubNetFineTuneHook) against the uniform bits
fine-tuned the same way, against the uniform-bit models of the same SuperNet,
over average bit-widths 2.5 to 7, for several seeds. Every step is a tool:
train.py (FP32, multi-precision, two SuperNets), hessian.py,
search_subnet.py (ILP + evaluation without retraining).

    python benchmarks/pareto_digits.py [--seeds 0 1 2] [--work-dir ...]
        [--supernet-epochs 5] [--bn-calibration 8] [--finetune-epochs 2]

Prints a table (mean ± sample std over the seeds per budget; "vs uniform":
the SubNet minus the best uniform model of no greater average bits, seed
by seed) and saves benchmarks/results/pareto_digits.json and .png. Finished
runs in the work folder are reused.
"""
import argparse
import copy
import os
import os.path as osp

from mmdrq.datasets import write_digits
from mmdrq.quantization.bitwidths import bit_name, tag
from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import (data_options, evaluated_search, run_tool,
                                   train_and_test)

from fidelity_digits import (DIGITS, FP32_CONFIG, HERE, QAT_CONFIG, ROOT,
                             TOOLS, finished_run, summarize)

MP_CONFIG = osp.join(DIGITS, 'resnet_digits_drq-mp_8642.py')
FT_CONFIG = osp.join(DIGITS, 'resnet_digits_drq-mp_8642_subnet-ft.py')
# front -> (SuperNet, search objective)
FRONTS = {'hasb': ('hasb', 'trace_bits'),
          'hasb_perturbation': ('hasb', 'perturbation'),
          'hasb_measured': ('hasb', 'measured'),
          'uniform': ('uniform', 'trace_bits')}
SUPERNETS = {'hasb': lambda traces: [f'custom_hooks.0.traces={traces}'],
             'uniform': lambda traces: ['custom_hooks.0.uniform=True',
                                        'custom_hooks.0.traces=None']}


def run(config, root, work, epochs, seed, options=()):
    """``train_and_test`` of ``config`` on ``root``, or its finished run in
    ``work``."""
    metrics, ckpt = finished_run(work, epochs)
    if metrics is None:
        metrics, ckpt, _ = train_and_test(TOOLS, config, work, root, epochs,
                                          seed, list(options))
    return metrics, ckpt


def search(config, ckpt, traces, objective, root, out, calibration, log):
    """tools/search_subnet.py's ``search.json`` (reused once evaluated)."""
    done = evaluated_search(out)
    if done is None:
        run_tool([osp.join(TOOLS, 'search_subnet.py'), config, ckpt,
                  *([] if objective == 'measured' else ['--traces', traces]),
                  '--kind', 'avg_bits', '--range', '2.5',
                  '7', '--steps', '10', '--objective', objective,
                  '--input-shape', '1', '3', '16', '16', '--work-dir', out,
                  *(['--bn-calibration', str(calibration)] if calibration
                    else []),
                  '--cfg-options', *data_options(root)], log)
        done = evaluated_search(out)
    return done


def run_seed(args, seed, root):
    """Every front of one seed: ``{front[_bn]: search.json}``."""
    work = osp.join(osp.abspath(args.work_dir), f'seed{seed}')
    _, fp_ckpt = run(FP32_CONFIG, root, osp.join(work, 'fp32'),
                     args.fp32_epochs, seed)
    _, mp_ckpt = run(QAT_CONFIG, root, osp.join(work, 'multi'),
                     args.qat_epochs, seed, [f'load_from={fp_ckpt}'])
    traces = osp.join(work, 'traces.json')
    if not osp.isfile(traces):
        run_tool([osp.join(TOOLS, 'hessian.py'), QAT_CONFIG, mp_ckpt,
                  '--out', traces, '--num-samples', '512', '--cfg-options',
                  *data_options(root)], osp.join(work, 'hessian.log'))
    supernets = {name: run(MP_CONFIG, root, osp.join(work, name),
                           args.supernet_epochs, seed,
                           [f'load_from={mp_ckpt}', *hook(traces)])[1]
                 for name, hook in SUPERNETS.items()}
    fronts = {}
    for front, (supernet, objective) in FRONTS.items():
        for calibration in (0, args.bn_calibration):
            name = front + ('_bn' if calibration else '')
            fronts[name] = search(
                MP_CONFIG, supernets[supernet], traces, objective, root,
                osp.join(work, name, 'search'), calibration,
                osp.join(work, f'search_{name}.log'))
    if args.finetune_epochs:
        fronts['hasb_measured_ft'] = finetune(
            fronts['hasb_measured'], supernets['hasb'], root,
            osp.join(work, 'finetune'), args.finetune_epochs, seed)
    return fronts


def finetune(front, supernet, root, work, epochs, seed):
    """``front`` (a search.json) with each SubNet and each uniform bit
    fine-tuned alone from ``supernet`` for ``epochs`` at its own bits and
    tested: the uniform models are tuned as the SubNets are, so they stay a
    fair baseline."""
    tuned, metric = copy.deepcopy(front), front['metric']
    layers = list(front['subnets'][0]['layer_bits'])
    uniform = {bit_name(b): b for b in (8, 6, 4, 2)}
    os.makedirs(work, exist_ok=True)
    for entry in tuned['subnets'] + tuned['uniform']:
        name = entry['name'] if 'layer_bits' in entry \
            else f'uniform_{entry["name"]}'
        path = osp.join(work, name + '.json')
        if not osp.isfile(path):
            bits = entry.get('layer_bits') or dict.fromkeys(
                layers, uniform[entry['name']])
            atomic_write_json(path, dict(layer_bits=bits))
        metrics, _ = run(FT_CONFIG, root, osp.join(work, name), epochs, seed,
                         [f'load_from={supernet}',
                          f'custom_hooks.0.subnet={path}',
                          f'val_cfg.subnets=[{path}]',
                          f'test_cfg.subnets=[{path}]'])
        entry[metric] = metrics[metric + tag(name)]
    return tuned


def best_uniform(uniform, metric, cost):
    """The metric of the best uniform model of average bits <= ``cost``
    (None if every uniform model costs more)."""
    fits = [u[metric] for u in uniform if u['avg_bits'] <= cost + 1e-9]
    return max(fits) if fits else None


def table(results) -> str:
    """Per front and budget: mean ± std of the SubNets' metric and of its
    difference to the best uniform model of no greater cost."""
    seeds = sorted(results['seeds'])
    first = results['seeds'][seeds[0]]
    metric = first['hasb']['metric']
    lines = [f'# Mixed precision on digits: {metric} (%) by average-bit '
             f'budget, seeds {seeds}\n',
             'mean ± sample std over the seeds; vs uniform: the SubNet minus '
             'the best uniform model of the same SuperNet and evaluation '
             'whose average bits are no greater, seed by seed (goal: >= 0, '
             'and >= +0.5 between two uniform bit-widths). `_bn`: every '
             'setting evaluated after BN re-calibration.\n',
             '| front | ' + ' | '.join(
                 f'{s["budget"]:g}' for s in first['hasb']['subnets'])
             + ' |', '|---' * (len(first['hasb']['subnets']) + 1) + '|']
    for front in first:
        cells = []
        for index in range(len(first[front]['subnets'])):
            values, gaps = [], []
            for seed in seeds:
                content = results['seeds'][seed][front]
                entry = content['subnets'][index]
                values.append(entry[metric])
                best = best_uniform(content['uniform'], metric,
                                    entry['avg_bits'])
                if best is not None:
                    gaps.append(entry[metric] - best)
            mean, std = summarize(values)
            gap = f'{summarize(gaps)[0]:+.2f}' if gaps else '-'
            cells.append(f'{mean:.2f} ± {std:.2f} ({gap})')
        lines.append(f'| {front} | ' + ' | '.join(cells) + ' |')
    lines += ['\nUniform bits (mean ± std over the seeds):\n',
              '| front | ' + ' | '.join(
                  u['name'] for u in first['hasb']['uniform']) + ' |',
              '|---' * (len(first['hasb']['uniform']) + 1) + '|']
    for front in first:
        cells = [summarize([results['seeds'][s][front]['uniform'][i][metric]
                            for s in seeds])
                 for i in range(len(first[front]['uniform']))]
        lines.append(f'| {front} | ' + ' | '.join(
            f'{m:.2f} ± {s:.2f}' for m, s in cells) + ' |')
    return '\n'.join(lines) + '\n'


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    seeds = sorted(results['seeds'])
    first = results['seeds'][seeds[0]]
    metric = first['hasb']['metric']
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def mean_points(front, key):
        points = []
        for i, entry in enumerate(first[front][key]):
            values = [results['seeds'][s][front][key][i] for s in seeds]
            points.append((summarize([v['avg_bits'] for v in values])[0],
                           *summarize([v[metric] for v in values])))
        return sorted(points)

    for front in first:
        x, y, err = zip(*mean_points(front, 'subnets'))
        ax.errorbar(x, y, yerr=err, fmt='o-' if front.endswith('_bn')
                    else 'o--', capsize=2, label=f'{front} SubNets')
    for front, style in (('hasb', 'k^'), ('hasb_bn', 'r^')):
        x, y, err = zip(*mean_points(front, 'uniform'))
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=2,
                    label=f'uniform bits ({front})')
    ax.set_xlabel('average bit-width')
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title(f'digits: mixed-precision Pareto fronts, seeds {seeds}')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--work-dir', default='work_dirs/pareto_digits')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=int, default=30)
    parser.add_argument('--qat-epochs', type=int, default=10)
    parser.add_argument('--supernet-epochs', type=int, default=5)
    parser.add_argument('--bn-calibration', type=int, default=8,
                        help='training batches per setting of the '
                        're-calibrated fronts')
    parser.add_argument('--finetune-epochs', type=int, default=2,
                        help='epochs of each SubNet\'s and uniform bit\'s '
                        'fine-tune (0: none)')
    parser.add_argument('--out', default=osp.join(HERE, 'results',
                                                  'pareto_digits'),
                        help='writes OUT.json, OUT.md and OUT.png')
    args = parser.parse_args()
    root = osp.abspath(args.data_root)
    write_digits(root)
    # the tools measure this checkout's mmdrq, not an installed copy
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    results = dict(bn_calibration=args.bn_calibration, seeds={
        seed: run_seed(args, seed, root) for seed in args.seeds})
    atomic_write_json(args.out + '.json', results)
    text = table(results)
    atomic_write(args.out + '.md', lambda f: f.write(text.encode()))
    plot(results, args.out + '.png')
    print(text)
    print(f'saved {args.out}.json, .md and .png')


if __name__ == '__main__':
    main()
