"""Low-bit detection and segmentation on real images: FP32 training, then
one-shot {8,6,4,2} Double Rounding QAT from that checkpoint (ALRS), for
FCOS-R18 (GN head, bbox mAP) and FCN-R18-D8 (mIoU), over several seeds,
with one row per method option (a set of ``--cfg-options`` on the QAT
config), and controls: the FP32 model trained on as the QAT is, so that a
QAT bit above FP32 can be told from the extra training. Data:
tools/make_real_datasets.py (scikit-image's sample images).
Each run is the real tools/train.py, then tools/test.py for the metric at
every bit.

    python benchmarks/lowbit_detseg.py [--seeds 0 1 2] [--tasks det seg]
        [--rows baseline ...]

Writes benchmarks/results/lowbit_detseg.md (mean ± sample std per bit) and
lowbit_detseg.json. A run whose work folder holds its metrics, made with
the same config and options, is reused, so a later call with other rows
or seeds trains only what is new. The table and JSON are made from every
finished run in the work folder whose options are a row's as defined now
(so calls for different tasks, rows or seeds, also at the same time, add
up), merged into the JSON already in the output folder: its seeds and rows
that the work folder lacks (runs made elsewhere) are kept when the row's
options are the same and the work folder's FP32 metric of each of their seeds
is the one they were trained from; each row says over which seeds.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import time

from mmdrq.datasets import write_real_detection, write_real_segmentation
from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import recorded_run

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
        write=write_real_detection, data='real_det',
        # the recommended config: the QAT config with this row's options
        recommended=('configs/detection/'
                     'fcos_r18_gn-head_drq-8642_300iters_real.py',
                     'freeze_bn_stats_late_long_qat')),
    'seg': dict(
        name='segmentation: FCN-R18-D8, mIoU',
        fp32=osp.join(ROOT, 'configs/segmentation/fcn_r18-d8_fp32_real.py'),
        qat=osp.join(ROOT, 'configs/segmentation/fcn_r18-d8_drq-8642_real.py'),
        metric='mIoU', scale=1.0,
        write=write_real_segmentation, data='real_seg',
        recommended=('configs/segmentation/'
                     'fcn_r18-d8_drq-8642_300iters_real.py',
                     'freeze_bn_stats_long_qat')),
}

# One row per method option (docs/lowbit.md), each one change from the
# baseline (its folder name, so a plain word): --cfg-options on the QAT
# config per task; a row without a task does not apply to it (FCN-R18-D8 has no GN/LN and no shared head).
GN_LN_OFF = 'model.quantizer.switchable_gn_ln=False'
MSE_INIT = 'model.quantizer.act_quantizer.init_method=mse'
# BN statistics updated in QAT, as before FreezeBNStatsHook joined the
# QAT configs (their only custom hook)
BN_STATS_UPDATED = 'custom_hooks=[]'
# the baseline as first measured: the QAT configs' activation init is MSE
# since act_init_mse, and their BN statistics frozen since freeze_bn_stats
BASELINE = [GN_LN_OFF, 'model.quantizer.act_quantizer.init_method=percentile',
            BN_STATS_UPDATED]
# the configs as shipped
SHIPPED = [GN_LN_OFF, MSE_INIT]


def qat_iters(iters: int) -> list:
    """``--cfg-options`` for ``iters`` QAT iterations, the cosine stretched
    to match."""
    return [f'train_cfg.max_iters={iters}', f'param_scheduler.0.T_max={iters}',
            f'default_hooks.checkpoint.interval={iters}']


LONG_QAT = qat_iters(300)


def both(options: list) -> dict:
    """A row's options, the same for detection and segmentation."""
    return dict(det=options, seg=options)


# the recommended detection config's row: 300 iterations, BN statistics
# frozen from the middle
LATE_LONG_QAT = SHIPPED + ['custom_hooks.0.begin=150', *LONG_QAT]
FP_DISTILL = 'model.fp_distill.checkpoint={fp32}'
HEAD_DISTILL = ['model.head_distill.target=logits',
                'model.head_distill.weight=1.0']
ROWS = {
    'baseline': both(BASELINE),
    'switchable_norm': dict(
        det=['model.quantizer.switchable_gn_ln=True', *BASELINE[1:]]),
    'multi_level_norm': dict(
        det=BASELINE + ['model.multi_level_norm=True']),
    'head_distill': both(BASELINE + HEAD_DISTILL),
    'bit_loss_weights': both(BASELINE + ['model.bit_loss_weights.2=2.0']),
    'alrs_heads': dict(
        det=BASELINE + ['optim_wrapper.alrs_modules=[bbox_head]'],
        seg=BASELINE + ['optim_wrapper.alrs_modules=[decode_head]']),
    # activation scales at the least quantization MSE (LSQ+), not the
    # 99.9th percentile over each bit's largest integer
    'act_init_mse': both([GN_LN_OFF, MSE_INIT, BN_STATS_UPDATED]),
    # act_init_mse and a quarter of the QAT learning rate (Adam 5e-5, not
    # 2e-4)
    'act_init_mse_lr_low': both([GN_LN_OFF, MSE_INIT, BN_STATS_UPDATED,
                                 'optim_wrapper.optimizer.lr=5e-5']),
    # act_init_mse with switchable GN/LN
    'act_init_mse_gn_ln': dict(
        det=['model.quantizer.switchable_gn_ln=True', MSE_INIT,
             BN_STATS_UPDATED]),
    # a tenth of the lr, and a quarter over three times the iterations
    'act_init_mse_lr_min': dict(
        seg=[GN_LN_OFF, MSE_INIT, BN_STATS_UPDATED,
             'optim_wrapper.optimizer.lr=2e-5']),
    'act_init_mse_lr_low_long_qat': dict(
        seg=[GN_LN_OFF, MSE_INIT, BN_STATS_UPDATED,
             'optim_wrapper.optimizer.lr=5e-5', *LONG_QAT]),
    # three times the QAT iterations, the cosine stretched to match
    'long_qat': both(BASELINE + LONG_QAT),
    'act_init_mse_long_qat': both([GN_LN_OFF, MSE_INIT, BN_STATS_UPDATED,
                                   *LONG_QAT]),
    # act_init_mse and every BN's statistics frozen at the FP32 ones
    # (FreezeBNStatsHook): the configs as shipped
    'freeze_bn_stats': both(SHIPPED),
    # freeze_bn_stats and one more change
    'freeze_bn_stats_gn_ln': dict(
        det=['model.quantizer.switchable_gn_ln=True', MSE_INIT]),
    'freeze_bn_stats_head_distill': both(SHIPPED + HEAD_DISTILL),
    # and the highest bit's box outputs as targets too (box_weight)
    'freeze_bn_stats_box_distill': dict(
        det=SHIPPED + HEAD_DISTILL + ['model.head_distill.box_weight=1.0']),
    'freeze_bn_stats_box_distill_5': dict(
        det=SHIPPED + HEAD_DISTILL + ['model.head_distill.box_weight=5.0']),
    'freeze_bn_stats_long_qat': both(SHIPPED + LONG_QAT),
    # the statistics of every bit's BN copies update for the first half of
    # the QAT, then freeze
    'freeze_bn_stats_late': both(SHIPPED + ['custom_hooks.0.begin=50']),
    # only the 2-bit BN copies' statistics update for the first half
    'freeze_bn_stats_2bit_late': both(
        SHIPPED + ['custom_hooks.0.bit_begin.2=50']),
    'freeze_bn_stats_late_long_qat': dict(det=LATE_LONG_QAT),
    # the statistics frozen at iteration 150 are a running average over
    # about 100 batches (BN momentum 0.01), not the last 10 (0.1)
    'freeze_bn_stats_late_long_qat_slow_bn_stats': dict(
        det=LATE_LONG_QAT + [
            'model.architecture.backbone.norm_cfg.momentum=0.01']),
    # six times the iterations, frozen from the middle
    'freeze_bn_stats_late_longer_qat': dict(
        det=SHIPPED + ['custom_hooks.0.begin=300', *qat_iters(600)]),
    # each FPN level's own activation scales in the shared head
    'freeze_bn_stats_level_act': dict(
        det=SHIPPED + ['model.multi_level_act_scales=True']),
    'freeze_bn_stats_late_long_qat_level_act': dict(
        det=LATE_LONG_QAT + ['model.multi_level_act_scales=True']),
    'freeze_bn_stats_late_long_qat_bit_loss_weights': dict(
        det=LATE_LONG_QAT + ['model.bit_loss_weights.2=2.0']),
    # the weight scales keep their init (lr 0): in the recommended row they
    # grow 10 to 45% (the high bits' steps), which leaves half to 90% of
    # the 2-bit weights at 0
    'freeze_bn_stats_late_long_qat_fixed_weight_scales': dict(
        det=LATE_LONG_QAT + ['optim_wrapper.paramwise_cfg.custom_keys.'
                             'weight_quantizer.lr_mult=0.0']),
    # no weight decay: Adam's L2 term, taken four times per iteration (once
    # per bit), shrinks the weights of layers with small gradients (FPN
    # convs to a fifth in 300 iterations)
    'freeze_bn_stats_late_long_qat_no_weight_decay': dict(
        det=LATE_LONG_QAT + ['optim_wrapper.optimizer.weight_decay=0.0']),
    # the weight scale's exact gradient: each bit's keeps the 2**d of
    # s * 2**d (64 at 2 bits of 8), so the low bits pull the shared scale
    # harder
    'freeze_bn_stats_late_long_qat_exact_scale_grad': dict(
        det=LATE_LONG_QAT + [
            'model.quantizer.weight_quantizer.scale_grad=exact']),
    'freeze_bn_stats_late_long_qat_head_distill': dict(
        det=LATE_LONG_QAT + HEAD_DISTILL),
    'freeze_bn_stats_bit_loss_weights': both(
        SHIPPED + ['model.bit_loss_weights.2=2.0']),
    # ALRS off (every bit's scales at the full lr) and adaptive
    'freeze_bn_stats_alrs_off': both(SHIPPED + ['optim_wrapper.mode=off']),
    'freeze_bn_stats_alrs_adaptive': both(
        SHIPPED + ['optim_wrapper.mode=adaptive']),
    # the recommended rows, every bit also learning the FP32 model's logits
    # (``{fp32}``: the seed's FP32 checkpoint)
    'freeze_bn_stats_late_long_qat_fp_distill': dict(
        det=LATE_LONG_QAT + [FP_DISTILL]),
    'freeze_bn_stats_long_qat_fp_distill': dict(
        seg=SHIPPED + LONG_QAT + [FP_DISTILL]),
}


def recommended(iters: int, *extra: str) -> dict:
    """The recommended configs' rows at ``iters`` QAT iterations (the
    detector's BN statistics frozen from the middle), with ``extra``."""
    return dict(det=[*SHIPPED, f'custom_hooks.0.begin={iters // 2}',
                     *qat_iters(iters), *extra],
                seg=[*SHIPPED, *qat_iters(iters), *extra])


# the recommended rows with a cheaper bit schedule (docs/training.md,
# Cheaper schedules), for benchmarks/qat_cost.py's question on real images
for _kind in ('sandwich', 'random', 'progressive'):
    ROWS[f'recommended_{_kind}'] = recommended(
        300, f'model.bit_schedule.kind={_kind}')
# half the bit steps of the recommended rows (600 of 1200): the same
# schedule over half the iterations, or the sandwich (3 bits an iteration)
# over two thirds (the same metric in half the time?)
ROWS['recommended_150iters'] = recommended(150)
ROWS['recommended_sandwich_200iters'] = recommended(
    200, 'model.bit_schedule.kind=sandwich')


def with_fp32(options: list, fp_ckpt: str) -> list:
    """A row's options with ``{fp32}`` replaced by the FP32 checkpoint."""
    return [o.replace('{fp32}', fp_ckpt) for o in options]


def _trained_on(iters: int) -> list:
    """``--cfg-options`` that train an FP32 config on from its checkpoint as
    the QAT config does: Adam 2e-4 (decay 5e-5), cosine over ``iters``
    iterations, BN statistics frozen."""
    return ['optim_wrapper.optimizer.type=Adam',
            'optim_wrapper.optimizer.lr=2e-4',
            'optim_wrapper.optimizer.weight_decay=5e-5',
            'param_scheduler.0.start_factor=1.0',  # no warm-up
            f'param_scheduler.1.T_max={iters}', f'train_cfg.max_iters={iters}',
            f'default_hooks.checkpoint.interval={iters}',
            'custom_hooks.0.begin=0']


# Controls: the FP32 model trained on as the QAT rows are, so a QAT bit above
# FP32 can be told from the extra training (each a FP32 metric per seed)
CONTROLS = {'fp32_trained_on': _trained_on(100),
            'fp32_trained_on_long': _trained_on(300),
            'fp32_trained_on_longer': _trained_on(600)}


def data_options(task: str, root: str):
    """``--cfg-options`` that point every dataloader (and the COCO
    evaluators) at ``root``."""
    options = [f'{k}_dataloader.dataset.data_root={root}'
               for k in ('train', 'val', 'test')]
    if task == 'det':
        ann = osp.join(root, 'annotations', 'instances_val.json')
        options += [f'{k}_evaluator.ann_file={ann}' for k in ('val', 'test')]
    return options


def train_and_test(config, work, seed, options):
    """``recorded_run`` of ``config`` in ``work``; returns (metrics,
    checkpoint, training seconds)."""
    record = recorded_run(TOOLS, config, work, seed, options, ROOT)
    return record['metrics'], record['checkpoint'], record['seconds']


def summarize(values):
    """(mean, sample std) of ``values``; std 0 for a single value."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: dict) -> dict:
    """Mean and spread of ``{seed: value}``."""
    mean, std = summarize(list(values.values()))
    return dict(mean=mean, std=std, values=values)


def read_record(work):
    """The ``run.json`` a finished run left in ``work``, or None."""
    path = osp.join(work, 'run.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _started_from(record, fp_record, options) -> bool:
    """Whether ``record``'s run had ``options`` last, after loading the
    checkpoint of ``fp_record``."""
    if record is None:
        return False
    used = record['settings']['options']
    start = len(used) - len(options)
    return used[start:] == options and \
        used[start - 1] == f'load_from={fp_record["checkpoint"]}'


def collect(work_dir: str) -> dict:
    """Results of every finished run under ``work_dir``: per task, the FP32
    metric per seed, each control's, and, per row of ``ROWS``, each bit's
    metric per seed (runs from that seed's FP32 checkpoint with the row's
    options)."""
    results = {}
    for task, spec in TASKS.items():
        fp, rows, controls = {}, {}, {}
        folder = osp.join(work_dir, task)
        seeds = sorted((int(name[4:]) for name in os.listdir(folder)
                        if name.startswith('seed')) if osp.isdir(folder)
                       else [])
        for seed in seeds:
            work = osp.join(folder, f'seed{seed}')
            fp_record = read_record(osp.join(work, 'fp32'))
            if fp_record is None:
                continue
            fp[seed] = fp_record['metrics'][spec['metric']] * spec['scale']
            for name, options in CONTROLS.items():
                record = read_record(osp.join(work, name))
                if _started_from(record, fp_record, options):
                    controls.setdefault(name, {})[seed] = \
                        record['metrics'][spec['metric']] * spec['scale']
            for row, per_task in ROWS.items():
                if task not in per_task:
                    continue
                record = read_record(osp.join(work, row))
                if not _started_from(record, fp_record, with_fp32(
                        per_task[task], fp_record['checkpoint'])):
                    continue
                cells = rows.setdefault(row, dict(
                    {str(b): {} for b in BITS}, options=per_task[task],
                    seconds={}))
                for b in BITS:
                    cells[str(b)][seed] = record['metrics'][
                        f'{spec["metric"]}@w{b}a{b}'] * spec['scale']
                cells['seconds'][seed] = record['seconds']
        if not fp:
            continue
        results[task] = dict(
            name=spec['name'], fp32=cell(fp), rows={},
            controls={name: dict(cell(values), options=CONTROLS[name])
                      for name, values in controls.items()})
        for row, cells in rows.items():
            results[task]['rows'][row] = dict(
                {str(b): cell(cells[str(b)]) for b in BITS},
                seeds=sorted(cells['seconds']), options=cells['options'],
                seconds=statistics.mean(cells['seconds'].values()))
    return results


def _by_seed(values: dict) -> dict:
    """``{seed: value}`` with int seeds (JSON stores them as strings)."""
    return {int(seed): value for seed, value in values.items()}


def merge(old: dict, new: dict) -> dict:
    """``new`` (``collect``'s results) with the seeds and rows of ``old``
    (an earlier JSON) that it lacks: a row's seed is kept when the row has
    the same options and ``new`` has no FP32 metric of that seed or the same
    one (what the row was trained from); ``new`` wins where both have a
    value. Controls merge alike. Rows absent from ``ROWS`` are dropped."""
    merged = {}
    for task in TASKS:
        if task not in old and task not in new:
            continue
        before = old.get(task, dict(fp32=dict(values={}), rows={}))
        after = new.get(task, dict(fp32=dict(values={}), rows={}))
        fp_old = _by_seed(before['fp32']['values'])
        fp_new = _by_seed(after['fp32']['values'])
        seeds_ok = {s for s, v in fp_old.items() if fp_new.get(s, v) == v}
        rows = {}
        for row, per_task in ROWS.items():
            cells = {str(b): {} for b in BITS}
            seconds = {}
            for source in (before, after):
                content = source['rows'].get(row)
                if content is None or \
                        content['options'] != per_task.get(task):
                    continue
                keep = [s for s in content['seeds']
                        if source is after or s in seeds_ok]
                for b in BITS:
                    values = _by_seed(content[str(b)]['values'])
                    cells[str(b)].update({s: values[s] for s in keep})
                seconds.update({s: content['seconds'] for s in keep})
            if seconds:
                rows[row] = dict(
                    {str(b): cell(cells[str(b)]) for b in BITS},
                    seeds=sorted(seconds), options=per_task[task],
                    seconds=statistics.mean(seconds.values()))
        controls = {}
        for name, options in CONTROLS.items():
            values = {}
            for source in (before, after):
                content = source.get('controls', {}).get(name)
                if content is not None and content['options'] == options:
                    values.update({s: v for s, v in _by_seed(
                        content['values']).items()
                        if source is after or s in seeds_ok})
            if values:
                controls[name] = dict(cell(values), options=options)
        merged[task] = dict(name=TASKS[task]['name'],
                            fp32=cell({**fp_old, **fp_new}),
                            rows=rows, controls=controls)
    return merged


def differences(values: dict, reference: dict) -> list:
    """``values[s] - reference[s]`` over the seeds both have (a row may
    have fewer seeds than its reference)."""
    return [values[s] - reference[s] for s in values if s in reference]


def gain(rows: dict, row: str) -> str:
    """Mean w2a2 difference of ``row`` to the baseline, seed by seed."""
    if row == 'baseline' or 'baseline' not in rows:
        return '-'
    low = str(min(BITS))
    diffs = differences(rows[row][low]['values'],
                        rows['baseline'][low]['values'])
    return f'{statistics.mean(diffs):+.1f}' if diffs else '-'


def below_fp32(content: dict, row: str) -> str:
    """w2a2 minus the FP32 checkpoint it started from, seed by seed: mean
    ± sample std (the goals' measure; pairing removes the spread between
    the seeds' FP32 checkpoints)."""
    diffs = differences(content['rows'][row][str(min(BITS))]['values'],
                        content['fp32']['values'])
    if not diffs:
        return '-'
    mean, spread = summarize(diffs)
    return f'{mean:+.1f} ± {spread:.1f}'


def table(results: dict) -> str:
    """The markdown tables of ``collect``'s results."""
    lines = ['# Low-bit detection and segmentation on real images\n',
             'mean ± sample std over the seeds of each row; one-shot '
             '{8,6,4,2} Double Rounding QAT from each seed\'s FP32 '
             'checkpoint, with ALRS (benchmarks/lowbit_detseg.py). QAT s/run: '
             'wall seconds of one QAT tools/train.py, which vary with the '
             'load of the machine. Controls: the FP32 checkpoint trained on '
             'as the QAT is (Adam 2e-4, frozen BN statistics) for 100 '
             '(`fp32_trained_on`), 300 (`_long`) or 600 (`_longer`) '
             'iterations. w2a2 - FP32: each seed\'s w2a2 minus the FP32 '
             'checkpoint it started from, mean ± sample std.\n']
    for task, content in results.items():
        fp = content['fp32']
        config, row = TASKS[task]['recommended']
        lines += [f'\n## {content["name"]}\n',
                  f'The recommended config, `{config}`, is row `{row}`.\n',
                  f'FP32: {fp["mean"]:.1f} ± {fp["std"]:.1f} (seeds '
                  f'{sorted(fp["values"])})\n',
                  *(f'control {name}: {c["mean"]:.1f} ± {c["std"]:.1f} '
                    f'(seeds {sorted(c["values"])})\n'
                    for name, c in content.get('controls', {}).items()),
                  '| row | seeds | ' + ' | '.join(f'w{b}a{b}' for b in BITS)
                  + ' | w2a2 - FP32 | w2a2 vs baseline | QAT s/run | '
                  'options |',
                  '|---' * (len(BITS) + 6) + '|']
        for row, cells in content['rows'].items():
            bits = ' | '.join(f'{cells[str(b)]["mean"]:.1f} ± '
                              f'{cells[str(b)]["std"]:.1f}' for b in BITS)
            options = ' '.join(f'`{o}`' for o in cells['options'])
            lines.append(f'| {row} | {len(cells["seeds"])} | {bits} | '
                         f'{below_fp32(content, row)} | '
                         f'{gain(content["rows"], row)} | '
                         f'{cells["seconds"]:.0f} | {options} |')
    return '\n'.join(lines) + '\n'


def write_results(results: dict, out_dir: str):
    """``lowbit_detseg.json`` and ``.md`` in ``out_dir``, each atomically."""
    atomic_write_json(osp.join(out_dir, 'lowbit_detseg.json'), results)
    text = table(results)
    atomic_write(osp.join(out_dir, 'lowbit_detseg.md'),
                 lambda f: f.write(text.encode()))


def run_task(task, args):
    """FP32, the chosen controls and rows of ``task`` for every seed."""
    spec = TASKS[task]
    root = osp.join(osp.abspath(args.data_dir), spec['data'])
    spec['write'](root, *args.crops or (), seed=args.data_seed)
    options = data_options(task, root) + list(args.options)
    rows = [row for row in args.rows if task in ROWS[row]]
    for seed in args.seeds:
        work = osp.join(osp.abspath(args.work_dir), task, f'seed{seed}')
        fp, fp_ckpt, fp_seconds = train_and_test(
            spec['fp32'], osp.join(work, 'fp32'), seed, options)
        print(f'{task} seed {seed} FP32: '
              f'{fp[spec["metric"]] * spec["scale"]:.1f} ({fp_seconds:.0f} s)',
              flush=True)
        key = spec['metric']
        for name in args.controls:
            metrics, _, seconds = train_and_test(
                spec['fp32'], osp.join(work, name), seed,
                [*options, f'load_from={fp_ckpt}', *CONTROLS[name]])
            print(f'{task} seed {seed} {name}: '
                  f'{metrics[key] * spec["scale"]:.1f} ({seconds:.0f} s)',
                  flush=True)
        for row in rows:
            try:
                metrics, _, seconds = train_and_test(
                    spec['qat'], osp.join(work, row), seed,
                    [*options, f'load_from={fp_ckpt}',
                     *with_fp32(ROWS[row][task], fp_ckpt)])
            except SystemExit as error:  # one failed row: go on with others
                print(f'{task} seed {seed} {row} failed: {error}', flush=True)
                continue
            print(f'{task} seed {seed} {row}: ' + ', '.join(
                f'w{b} {metrics[key + f"@w{b}a{b}"] * spec["scale"]:.1f}'
                for b in BITS) + f' ({seconds:.0f} s)', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS),
                        default=list(TASKS))
    parser.add_argument('--rows', nargs='+', choices=list(ROWS),
                        default=list(ROWS), help='QAT rows to run')
    parser.add_argument('--controls', nargs='*', choices=list(CONTROLS),
                        default=list(CONTROLS),
                        help='FP32 controls to run (none: --controls)')
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
    # the tools measure this checkout's mmdrq, not an installed copy
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    start = time.time()
    for task in args.tasks:
        run_task(task, args)
    results = collect(osp.abspath(args.work_dir))
    previous = osp.join(args.out_dir, 'lowbit_detseg.json')
    if osp.isfile(previous):
        with open(previous) as f:
            results = merge(json.load(f), results)
    write_results(results, args.out_dir)
    print(table(results))
    print(f'{time.time() - start:.0f} s; saved lowbit_detseg.json and .md in '
          f'{args.out_dir}')


if __name__ == '__main__':
    main()
