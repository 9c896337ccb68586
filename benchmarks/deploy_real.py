"""PyTorch against the whole-pipeline ONNX Runtime graph on the real-image
detection and segmentation configs: FCOS-R18 with its GN head (``det``,
bbox mAP), the two-stage Faster R-CNN-R18 FPN (``frcnn``, bbox mAP) and
FCN-R18-D8 (``seg``, mIoU). Per task: the dataset
(tools/make_real_datasets.py, when missing), FP32 training with the real
tools/train.py, one-shot {8,6,4,2} Double Rounding QAT with the
recommended 300-iteration config from that checkpoint, then the metric at
every bit three ways with tools/test.py: PyTorch's fake-quant forward,
PyTorch ``--numerics deploy``, and ONNX Runtime's exact kernels on the
export folder of tools/export_onnx.py (``--graph auto``: the
post-processing inside the graph: FCOS's NMS; Faster R-CNN's RPN
proposals with NMS, RoiAlign, box head and NMS; FCN's resize and argmax;
the input shape from the test pipeline).

    python benchmarks/deploy_real.py [--tasks det frcnn seg] [--seed 0]
        [--work-dir work_dirs/deploy_real] [--heads N] [--always-heads]
        [--threads 1]
        [--options k=v ...]

Where the ONNX Runtime metric differs from ``--numerics deploy`` at some
bit (or always, with ``--always-heads``), the raw head tensors are
compared too: a ``--graph tensor`` export run by
``mmdrq_runtime.SwitchableSession`` against the PyTorch model under
``mmdrq.quantization.deploy_numerics``, on the first ``--heads`` test
images (default: all), the largest absolute difference per output and
the number of images with an output further apart than float rounding.
Not for Faster R-CNN: a two-stage detector exports only as the whole
pipeline (its RoI head runs on the proposals the graph selects), so it
has no ``--graph tensor`` form to compare; its table says so.

A finished step is reused: a training whose checkpoint exists, an export
folder newer than its checkpoint, a metrics file newer than what it
measures; so a second call only rewrites the tables. Writes
benchmarks/results/deploy_real.md and deploy_real.json.
"""
import argparse
import json
import os
import os.path as osp
import time

from lowbit_detseg import BITS, HERE, ROOT, TOOLS

from mmdrq.utils import atomic_write, atomic_write_json
from mmdrq.utils.tool_runs import run_tool

TASKS = {
    'det': dict(
        name='detection: FCOS-R18 GN head, bbox mAP',
        fp32='configs/detection/fcos_r18_gn-head_fp32_real.py',
        qat='configs/detection/fcos_r18_gn-head_drq-8642_300iters_real.py',
        metric='coco/bbox_mAP', scale=100.0, data='data/real_det'),
    # no head-tensor comparison: the reason, in the table
    'frcnn': dict(
        name='detection: Faster R-CNN-R18 FPN, bbox mAP',
        fp32='configs/detection/faster-rcnn_r18_fpn_fp32_real.py',
        qat='configs/detection/faster-rcnn_r18_fpn_drq-8642_300iters_real.py',
        metric='coco/bbox_mAP', scale=100.0, data='data/real_det',
        no_heads='No raw head comparison: a two-stage detector exports '
        'only as the whole pipeline (`--graph auto`; its RoI head runs on '
        'the proposals the graph selects), so there is no `--graph tensor` '
        'export to compare.'),
    'seg': dict(
        name='segmentation: FCN-R18-D8, mIoU',
        fp32='configs/segmentation/fcn_r18-d8_fp32_real.py',
        qat='configs/segmentation/fcn_r18-d8_drq-8642_300iters_real.py',
        metric='mIoU', scale=1.0, data='data/real_seg'),
}
# tools/test.py runs of the QAT checkpoint (or its export folder)
WAYS = {
    'pytorch': ('PyTorch (fake-quant forward)', []),
    'deploy': ('PyTorch --numerics deploy', ['--numerics', 'deploy']),
    'ort': ('ORT exact (whole-pipeline graph)',
            ['--backend', 'onnxruntime']),
}
# head outputs further apart than float rounding (a flipped integer)
APART = 1e-3
# no validation while training: tools/test.py measures every bit after
NO_VAL = ['val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']


def newer(path: str, *than: str) -> bool:
    """Whether ``path`` exists and is newer than every file of ``than``."""
    return osp.exists(path) and all(
        osp.getmtime(path) >= osp.getmtime(t) for t in than)


def timed(seconds: dict, key: str, args: list, log: str, reuse: bool):
    """``run_tool(args, log)`` unless ``reuse``; its wall seconds (or the
    earlier run's) go to ``seconds[key]`` with the command."""
    if reuse:
        print(f'  reuse {key}', flush=True)
        return
    print(f'  run {key}: python {" ".join(map(str, args))}', flush=True)
    wall = run_tool(args, log)
    seconds[key] = dict(seconds=round(wall, 1),
                        command='python ' + ' '.join(map(str, args)))
    print(f'  {key}: {wall:.0f} s', flush=True)


def cfg_options(options: list) -> list:
    """``--cfg-options`` and ``options``, or nothing when there are none."""
    return ['--cfg-options', *options] if options else []


def train(config, work, options, seconds, key):
    """tools/train.py of ``config`` in ``work``; the checkpoint (reused
    when ``last_checkpoint`` names one that exists)."""
    os.makedirs(work, exist_ok=True)
    record = osp.join(work, 'last_checkpoint')

    def checkpoint():
        if not osp.isfile(record):
            return None
        with open(record) as f:
            path = f.read().strip()
        return path if osp.isfile(path) else None

    ckpt = checkpoint()
    timed(seconds, key, [osp.join(TOOLS, 'train.py'), config, '--work-dir',
                         work, '--cfg-options', *options, *NO_VAL],
          osp.join(work, 'train.log'), reuse=ckpt is not None)
    ckpt = checkpoint()
    if ckpt is None:
        raise SystemExit(f'{config}: no checkpoint in {work}')
    return ckpt


def test(config, target, out, extra, seconds, key, source):
    """tools/test.py's metrics of ``target`` (checkpoint or export
    folder), reused when ``out`` is newer than ``source``."""
    timed(seconds, key, [osp.join(TOOLS, 'test.py'), config, target,
                         '--work-dir', osp.dirname(out), '--out', out,
                         *extra], out[:-len('.json')] + '.log',
          reuse=newer(out, source))
    with open(out) as f:
        return json.load(f)


def export(config, ckpt, folder, graph, seconds, key):
    """tools/export_onnx.py of ``ckpt`` into ``folder`` (``--graph``),
    reused when its meta.json is newer than the checkpoint."""
    timed(seconds, key, [osp.join(TOOLS, 'export_onnx.py'), config, ckpt,
                         '--out-dir', folder, '--graph', graph,
                         '--overwrite'], folder + '.log',
          reuse=newer(osp.join(folder, 'meta.json'), ckpt))


def output_names(outputs, task: str) -> list:
    """Names of the flattened head outputs (FCOS: cls/bbox/centerness per
    FPN level; a segmentor: its decode head's logits)."""
    from torch.utils import _pytree as pytree
    leaves = pytree.tree_flatten(outputs)[0]
    if task == 'det' and isinstance(outputs, (tuple, list)) and \
            len(outputs) == 3:
        return [f'{kind}[P{3 + level}]'
                for kind, group in zip(('cls_score', 'bbox_pred',
                                        'centerness'), outputs)
                for level in range(len(group))]
    if task == 'seg' and len(leaves) == 1:
        return ['seg_logits']
    return [f'output{i}' for i in range(len(leaves))]


def compare_heads(task, config, ckpt, folder, images, threads):
    """Largest |ONNX Runtime - PyTorch deploy numerics| per head output
    and bit on the first ``images`` test images, with the outputs' largest
    magnitude, and how many images have an output apart by more than
    ``APART``; a ``--graph tensor`` export in ``folder``."""
    import numpy as np
    import torch
    from mmengine.runner import Runner
    from torch.utils import _pytree as pytree

    from mmdrq.deploy.pipeline import load_for_export
    from mmdrq.quantization import use_bits
    from mmdrq.quantization.deploy_numerics import deploy_numerics
    from mmdrq_runtime import SwitchableSession
    cfg, model = load_for_export(config, ckpt)
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batches, count = [], 0
    for data in loader:
        inputs = model.data_preprocessor(data, False)['inputs']
        batches.append(inputs[:images - count])
        count += len(batches[-1])
        if count >= images:
            break
    session = SwitchableSession(folder, threads, 'exact')
    report = {}
    for bit in BITS:
        session.set_bits(bit)
        worst, images_apart = {}, 0
        for inputs in batches:
            with use_bits(model, bit), torch.no_grad(), deploy_numerics(
                    model, lambda m: m(inputs[:1], mode='tensor')):
                want = model(inputs, mode='tensor')
            names = output_names(want, task)
            want = [t.float().numpy() for t in pytree.tree_flatten(want)[0]]
            got = session.run(inputs.numpy())
            per_image = np.max([np.abs(w - g).reshape(len(w), -1).max(1)
                                for w, g in zip(want, got)], axis=0)
            images_apart += int((per_image > APART).sum())
            for name, w, g in zip(names, want, got):
                diff = float(np.abs(w - g).max())
                count_diff = int((w != g).sum())
                old = worst.get(name, dict(max_abs=0.0, differ=0, values=0,
                                           magnitude=0.0))
                worst[name] = dict(
                    max_abs=max(old['max_abs'], diff),
                    differ=old['differ'] + count_diff,
                    values=old['values'] + w.size,
                    magnitude=max(old['magnitude'], float(np.abs(w).max())))
        report[str(bit)] = dict(outputs=worst, images=count,
                                images_apart=images_apart)
    return report


def run_task(task, args, seconds):
    """Every step of ``task``; its results."""
    spec = TASKS[task]
    work = osp.join(osp.abspath(args.work_dir), task)
    options = [f'randomness.seed={args.seed}', *args.options]
    fp_ckpt = train(spec['fp32'], osp.join(work, 'fp32'), options, seconds,
                    f'{task} train fp32')
    fp = test(spec['fp32'], fp_ckpt, osp.join(work, 'fp32', 'metrics.json'),
              cfg_options(args.options), seconds, f'{task} test fp32',
              fp_ckpt)
    qat_ckpt = train(spec['qat'], osp.join(work, 'qat'),
                     [*options, f'load_from={fp_ckpt}'], seconds,
                     f'{task} train qat')
    onnx = osp.join(work, 'onnx')
    export(spec['qat'], qat_ckpt, onnx, 'auto', seconds,
           f'{task} export_onnx auto')
    rows = {}
    for way, (_, extra) in WAYS.items():
        target = onnx if way == 'ort' else qat_ckpt
        source = osp.join(onnx, 'meta.json') if way == 'ort' else qat_ckpt
        metrics = test(spec['qat'], target,
                       osp.join(work, 'qat', f'metrics_{way}.json'),
                       [*extra, *cfg_options(args.options)],
                       seconds, f'{task} test {way}', source)
        rows[way] = {str(b): metrics[f'{spec["metric"]}@w{b}a{b}']
                     * spec['scale'] for b in BITS}
        print(f'{task} {way}: ' + ', '.join(
            f'w{b} {rows[way][str(b)]:.2f}' for b in BITS), flush=True)
    result = dict(name=spec['name'], fp32=fp[spec['metric']] * spec['scale'],
                  rows=rows, checkpoints=dict(fp32=fp_ckpt, qat=qat_ckpt))
    differs = any(rows['ort'][str(b)] != rows['deploy'][str(b)]
                  for b in BITS)
    if spec.get('no_heads'):
        result['no_heads'] = spec['no_heads']
    elif args.heads and (differs or args.always_heads):
        tensor = osp.join(work, 'onnx_tensor')
        export(spec['qat'], qat_ckpt, tensor, 'tensor', seconds,
               f'{task} export_onnx tensor')
        start = time.time()
        result['heads'] = compare_heads(task, spec['qat'], qat_ckpt, tensor,
                                        args.heads, args.threads)
        seconds[f'{task} compare heads'] = dict(
            seconds=round(time.time() - start, 1), command='in-process')
    return result


def table(results: dict, seconds: dict) -> str:
    """The markdown of ``results``."""
    lines = ['# PyTorch against the whole-pipeline ONNX Runtime graph on '
             'real images\n',
             'One FP32 run and one {8,6,4,2} Double Rounding QAT run '
             '(recommended 300-iteration config, from that FP32 checkpoint) '
             'per task, seed 0, metrics by tools/test.py on the whole '
             'validation split (benchmarks/deploy_real.py). ORT exact: '
             'tools/export_onnx.py (`--graph auto`: the post-processing in '
             'the graph), then `tools/test.py --backend onnxruntime` '
             '(exact integer sums, the default kernels).\n']
    # in TASKS' order, whichever call wrote them first
    order = list(TASKS)
    for task, content in sorted(results.items(), key=lambda item: order.index(
            item[0]) if item[0] in order else len(order)):
        lines += [f'\n## {content["name"]}\n',
                  f'FP32: {content["fp32"]:.2f}\n',
                  '| | ' + ' | '.join(f'w{b}a{b}' for b in BITS) + ' |',
                  '|---' * (len(BITS) + 1) + '|']
        lines.append('| FP32 | ' + ' | '.join(
            f'{content["fp32"]:.2f}' for _ in BITS) + ' |')
        for way, (label, _) in WAYS.items():
            lines.append(f'| {label} | ' + ' | '.join(
                f'{content["rows"][way][str(b)]:.2f}' for b in BITS) + ' |')
        diffs = {b: content['rows']['ort'][str(b)] -
                 content['rows']['deploy'][str(b)] for b in BITS}
        lines.append('\nORT exact - PyTorch --numerics deploy: ' + ', '.join(
            f'w{b}a{b} {d:+.2f}' for b, d in diffs.items()) + '.')
        if content.get('notes'):
            lines.append('\n' + content['notes'])
        if content.get('no_heads'):
            lines.append('\n' + content['no_heads'])
        if content.get('heads'):
            lines += ['\nRaw head outputs, `--graph tensor` export in '
                      '`SwitchableSession` (exact kernels) against PyTorch '
                      'under `deploy_numerics`: largest |difference| '
                      '(values that differ / all; largest |value|):\n',
                      '| output | ' + ' | '.join(f'w{b}a{b}' for b in BITS)
                      + ' |', '|---' * (len(BITS) + 1) + '|']
            heads = content['heads']
            lines.append(f'| images with an output apart > {APART:g} | '
                         + ' | '.join(f'{heads[str(b)]["images_apart"]} of '
                                      f'{heads[str(b)]["images"]}'
                                      for b in BITS) + ' |')
            for name in heads[str(BITS[0])]['outputs']:
                cells = [heads[str(b)]['outputs'][name] for b in BITS]
                lines.append(f'| {name} | ' + ' | '.join(
                    f'{c["max_abs"]:.3g} ({c["differ"]}/{c["values"]}; '
                    f'{c["magnitude"]:.3g})' for c in cells) + ' |')
    lines += ['\n## Commands and wall times\n', '| step | s | command |',
              '|---|---|---|']
    for key, value in seconds.items():
        lines.append(f'| {key} | {value["seconds"]:.0f} | '
                     f'`{value["command"]}` |')
    return '\n'.join(lines) + '\n'


def read_json(path: str, seconds: dict):
    """(results, seconds) of the JSON at ``path`` (empty when there is
    none), ``seconds`` merged into its wall times."""
    previous = {}
    if osp.isfile(path):
        with open(path) as f:
            previous = json.load(f)
    return previous.get('results', {}), dict(previous.get('seconds', {}),
                                             **seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS),
                        default=list(TASKS))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-dir', default='work_dirs/deploy_real')
    parser.add_argument('--heads', type=int, default=1000,
                        help='test images for the head-tensor comparison '
                        '(default: every one; 0: none)')
    parser.add_argument('--always-heads', action='store_true',
                        help='compare the head tensors even where the '
                        'metrics agree')
    parser.add_argument('--threads', type=int, default=1,
                        help='ONNX Runtime threads of the head comparison')
    parser.add_argument('--options', nargs='+', default=[],
                        help='more --cfg-options for every run, e.g. '
                        'train_cfg.max_iters=2 for a smoke test')
    parser.add_argument('--out-dir', default=osp.join(HERE, 'results'))
    args = parser.parse_args()
    # the configs' data roots are relative to the repository; the tools
    # measure this checkout's mmdrq, not an installed copy
    os.chdir(ROOT)
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (ROOT, os.environ.get('PYTHONPATH')) if p)
    if not all(osp.isdir(TASKS[t]['data']) for t in args.tasks):
        run_tool([osp.join(TOOLS, 'make_real_datasets.py')],
                 osp.join(ROOT, 'data', 'make_real_datasets.log'))
    out_json = osp.join(args.out_dir, 'deploy_real.json')
    start = time.time()
    for task in args.tasks:
        seconds = {}
        result = run_task(task, args, seconds)
        # merged into the JSON as it is now: a call for the other task may
        # have written it meanwhile
        results, seconds = read_json(out_json, seconds)
        old = results.get(task, {})
        # a call without the head comparison keeps the last one of the
        # same checkpoints, and the notes written by hand
        if 'heads' not in result and 'heads' in old and \
                old.get('checkpoints') == result['checkpoints']:
            result['heads'] = old['heads']
        results[task] = dict(result, notes=old.get('notes', ''))
        atomic_write_json(out_json, dict(results=results, seconds=seconds))
    results, seconds = read_json(out_json, {})
    text = table(results, seconds)
    atomic_write(osp.join(args.out_dir, 'deploy_real.md'),
                 lambda f: f.write(text.encode()))
    print(text)
    print(f'{time.time() - start:.0f} s; saved deploy_real.json and .md in '
          f'{args.out_dir}')


if __name__ == '__main__':
    main()
