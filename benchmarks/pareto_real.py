"""Mixed precision on the real-image detection (FCOS-R18, bbox mAP) and
segmentation (FCN-R18-D8, mIoU) sets: per seed, the FP32 model, the
recommended {8,6,4,2} QAT from it, Hessian traces (32 images), the HASB
SuperNet (the task's mixed-precision config), then tools/search_subnet.py
for each front: the measured objective (the default) and the perturbation
one over average bits 2.5 to 7, and the measured objective over BitOps and
over size (the feasible range; these two reuse the average-bit search's
measured increases). Every SubNet is compared with the best
uniform model of the same SuperNet whose cost of that kind is no greater.
Each step is the real tool; data: tools/make_real_datasets.py's writers.

    python benchmarks/pareto_real.py [--tasks det seg] [--seeds 0 1 2]
        [--calibration-samples 64] [--work-dir work_dirs/pareto_real]
        [--val-crops 48 --out benchmarks/results/pareto_real_val48]

``--val-crops N`` evaluates the same SubNets and uniform models again on N
validation crops per source image (the writers' default is 16; the first
16 are the usual ones, the training crops are unchanged), against the
validation noise of the small sets.

Writes benchmarks/results/pareto_real.md and .json (mean ± sample std over
the seeds) and pareto_real_<task>.png. Finished steps in the work folder
are reused, so a later call with other seeds or tasks adds to them.
"""
import argparse
import json
import os
import os.path as osp

from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import evaluated_search, recorded_run, run_tool

from fidelity_digits import summarize
from lowbit_detseg import ROOT, TASKS, TOOLS, data_options

HERE = osp.dirname(osp.abspath(__file__))
MP_CONFIGS = {
    'det': 'configs/detection/fcos_r18_gn-head_drq-mp-8642_300iters_real.py',
    'seg': 'configs/segmentation/fcn_r18-d8_drq-mp-8642_300iters_real.py'}
SEARCH = {'det': ['--input-shape', '1', '3', '96', '96', '--metric',
                  'coco/bbox_mAP'],
          'seg': ['--input-shape', '1', '3', '64', '64', '--metric', 'mIoU']}
AVG_BITS = ['--kind', 'avg_bits', '--range', '2.5', '7', '--steps', '10']
# front -> (search options, cost kind); {increases}: the first front's
# search.json, {traces}: the seed's traces
FRONTS = {
    'measured': (AVG_BITS, 'avg_bits'),
    'perturbation': (['--objective', 'perturbation', '--traces', '{traces}',
                      *AVG_BITS], 'avg_bits'),
    'measured_bitops': (['--kind', 'bitops', '--steps', '8', '--increases',
                         '{increases}'], 'bitops'),
    'measured_size': (['--kind', 'size', '--steps', '8', '--increases',
                       '{increases}'], 'size')}


def run_seed(task, seed, work_dir, calibration_samples, val_crops=None):
    """``{front: search.json}`` of one task and seed (with ``val_crops``,
    evaluated on that many validation crops per source)."""
    spec = TASKS[task]
    root = osp.join(ROOT, 'data', spec['data'])
    spec['write'](root)
    data = data_options(task, root)
    work = osp.join(work_dir, task, f'seed{seed}')
    fp = recorded_run(TOOLS, spec['fp32'], osp.join(work, 'fp32'), seed,
                      data, ROOT)
    qat_config = osp.join(ROOT, spec['recommended'][0])
    qat = recorded_run(TOOLS, qat_config, osp.join(work, 'qat'), seed,
                       [*data, f'load_from={fp["checkpoint"]}'], ROOT)
    traces = osp.join(work, 'traces.json')
    if not osp.isfile(traces):
        run_tool([osp.join(TOOLS, 'hessian.py'), qat_config,
                  qat['checkpoint'], '--out', traces, '--num-samples', '32',
                  '--seed', seed, '--cfg-options', *data],
                 osp.join(work, 'hessian.log'))
    mp_config = osp.join(ROOT, MP_CONFIGS[task])
    mp = recorded_run(TOOLS, mp_config, osp.join(work, 'mp'), seed,
                      [*data, f'load_from={qat["checkpoint"]}',
                       f'custom_hooks.1.traces={traces}',
                       f'custom_hooks.1.seed={seed}'], ROOT)
    paths = dict(traces=traces, increases=osp.join(
        work, 'search_measured', 'search.json'))

    def search(front, options, suffix='', search_data=data, measured=()):
        out = osp.join(work, f'search_{front}{suffix}')
        done = evaluated_search(out)
        if done is None:
            run_tool([osp.join(TOOLS, 'search_subnet.py'), mp_config,
                      mp['checkpoint'],
                      *[o.format(**paths) for o in options], *SEARCH[task],
                      *measured, '--work-dir', out,
                      '--cfg-options', *search_data],
                     osp.join(work, f'search_{front}{suffix}.log'))
            done = evaluated_search(out)
        return done

    fronts = {}
    for front, (options, _) in FRONTS.items():
        fronts[front] = search(front, options, measured=[
            '--calibration-samples', calibration_samples]
            if front == 'measured' else [])
        print(f'{task} seed {seed} {front}: done', flush=True)
    if val_crops:
        # the same SubNets (the measured increases of the training images
        # reused), evaluated on a larger validation split of the same
        # sources: its first crops are the usual ones, the training crops
        # are the same
        suffix = f'_val{val_crops}'
        eval_root = root + suffix
        spec['write'](eval_root, num_val=val_crops)
        search_data = [o for o in data if o.startswith('train_')] + [
            o for o in data_options(task, eval_root)
            if not o.startswith('train_')]
        for front, (options, _) in FRONTS.items():
            if front == 'measured':
                options = [*options, '--increases', '{increases}']
            fronts[front] = search(front, options, suffix, search_data)
            print(f'{task} seed {seed} {front}{suffix}: done', flush=True)
    fronts['fp32'] = fp['metrics'][TASKS[task]['metric']]
    return fronts


def best_uniform(uniform, metric, kind, cost):
    """The best uniform model's metric at ``kind`` cost <= ``cost``."""
    fits = [u[metric] for u in uniform if u[kind] <= cost * (1 + 1e-9)]
    return max(fits) if fits else None


def budget_label(kind, budget):
    return {'avg_bits': f'{budget:g}', 'bitops': f'{budget:.2e}',
            'size': f'{budget / 1e6:.2f} MB'}[kind]


def task_table(task, by_seed) -> str:
    """One table per front (budgets as columns) and the uniform bits."""
    seeds = sorted(by_seed)
    scale = TASKS[task]['scale']
    first = by_seed[seeds[0]]
    metric = first['measured']['metric']
    fp = summarize([by_seed[s]['fp32'] * scale for s in seeds])
    lines = [f'## {TASKS[task]["name"]}, seeds {seeds}\n',
             f'FP32 {fp[0]:.1f} ± {fp[1]:.1f}. Uniform bits of the '
             'SuperNet: ' + ', '.join(
                 '{} {:.1f} ± {:.1f}'.format(u['name'], *summarize(
                     [by_seed[s]['measured']['uniform'][i][metric] * scale
                      for s in seeds]))
                 for i, u in enumerate(first['measured']['uniform'])) + '.\n']
    for front, (_, kind) in FRONTS.items():
        budgets = [s['budget'] for s in first[front]['subnets']]
        lines += [f'{front} (budget: {kind})\n',
                  '| | ' + ' | '.join(budget_label(kind, b) for b in budgets)
                  + ' |', '|---' * (len(budgets) + 1) + '|']
        values, gaps = [], []
        for index in range(len(budgets)):
            got, gap = [], []
            for seed in seeds:
                content = by_seed[seed][front]
                entry = content['subnets'][index]
                got.append(entry[metric] * scale)
                best = best_uniform(content['uniform'], metric, kind,
                                    entry[kind])
                if best is not None:
                    gap.append((entry[metric] - best) * scale)
            values.append('{:.1f} ± {:.1f}'.format(*summarize(got)))
            gaps.append('{:+.1f} ± {:.1f}'.format(*summarize(gap))
                        if gap else '-')
        lines += ['| SubNet | ' + ' | '.join(values) + ' |',
                  '| vs uniform | ' + ' | '.join(gaps) + ' |', '']
    return '\n'.join(lines)


def plot(task, by_seed, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    seeds = sorted(by_seed)
    scale = TASKS[task]['scale']
    kinds = ('avg_bits', 'bitops', 'size')
    fig, axes = plt.subplots(1, len(kinds), figsize=(15, 4))
    metric = by_seed[seeds[0]]['measured']['metric']

    def points(front, key, kind):
        out = []
        for i in range(len(by_seed[seeds[0]][front][key])):
            entries = [by_seed[s][front][key][i] for s in seeds]
            out.append((summarize([e[kind] for e in entries])[0],
                        *summarize([e[metric] * scale for e in entries])))
        return sorted(out)

    for ax, kind in zip(axes, kinds):
        for front, (_, front_kind) in FRONTS.items():
            if front_kind == kind:
                x, y, err = zip(*points(front, 'subnets', kind))
                ax.errorbar(x, y, yerr=err, fmt='o--', capsize=2,
                            label=f'{front} SubNets')
        x, y, err = zip(*points('measured', 'uniform', kind))
        ax.errorbar(x, y, yerr=err, fmt='k^', capsize=2, label='uniform')
        ax.set_xlabel(kind)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    fig.suptitle(f'{TASKS[task]["name"]}: mixed-precision fronts, '
                 f'seeds {seeds}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS),
                        default=list(TASKS))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--calibration-samples', type=int, default=64,
                        help='training images of the measured increases')
    parser.add_argument('--val-crops', type=int, metavar='N',
                        help='also evaluate every SubNet and uniform bit on '
                        'N validation crops per source image (the writers\' '
                        'default: 16), in search_<front>_valN folders; the '
                        'tables are of those')
    parser.add_argument('--work-dir', default='work_dirs/pareto_real')
    parser.add_argument('--out', default=osp.join(HERE, 'results',
                                                  'pareto_real'),
                        help='writes OUT.md, OUT.json and OUT_<task>.png')
    args = parser.parse_args()
    if args.val_crops is not None and args.val_crops < 1:
        parser.error(f'--val-crops must be at least 1, got {args.val_crops}')
    # the tools measure this checkout's mmdrq, not an installed copy
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    work = osp.abspath(args.work_dir)
    results = {}
    if osp.isfile(args.out + '.json'):  # other tasks' finished tables
        with open(args.out + '.json') as f:
            results = json.load(f)
    for task in args.tasks:
        results[task] = {str(seed): run_seed(
            task, seed, work, args.calibration_samples, args.val_crops)
            for seed in args.seeds}
    text = '# Mixed precision on the real-image sets\n\n' + (
        'Each front\'s SubNets (mean ± sample std over the seeds) and, '
        'seed by seed, the SubNet minus the best uniform model of the '
        'same SuperNet whose cost of that kind is no greater (goal: >= 0, '
        'and >= +0.5 between two uniform bit-widths).' + (
            f' Evaluated on {args.val_crops} validation crops per source '
            'image.' if args.val_crops else '') + '\n\n') + '\n'.join(
            task_table(task, results[task]) for task in sorted(results))
    atomic_write_json(args.out + '.json', results)
    atomic_write(args.out + '.md', lambda f: f.write(text.encode()))
    for task in args.tasks:
        plot(task, results[task], f'{args.out}_{task}.png')
    print(text)


if __name__ == '__main__':
    main()
