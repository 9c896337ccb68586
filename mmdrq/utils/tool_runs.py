"""Run the repository's tools as a user does (one subprocess each), for the
digits example and the benchmarks built on it."""
import json
import os
import os.path as osp
import subprocess
import sys
import time

from .atomic import atomic_write_json


def run_tool(args, log_path) -> float:
    """Run ``python <args>`` with output to ``log_path``; seconds."""
    start = time.time()
    with open(log_path, 'w') as log:
        done = subprocess.run([sys.executable] + [str(a) for a in args],
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f'{" ".join(map(str, args))} failed:\n{tail}')
    return time.time() - start


def data_options(root):
    """``--cfg-options`` that point every dataloader at ``root``."""
    return [f'{k}_dataloader.dataset.data_root={root}'
            for k in ('train', 'val', 'test')]


def train_and_test(tools, config, work, root, epochs, seed, options=()):
    """Train ``config`` for ``epochs`` with ``tools``/train.py, then test it
    with ``tools``/test.py, both with ``options`` (the model the checkpoint
    was trained as; ``load_from`` only for training); returns (metrics,
    checkpoint path, training seconds)."""
    os.makedirs(work, exist_ok=True)
    seconds = run_tool(
        [osp.join(tools, 'train.py'), config, '--work-dir', work,
         '--cfg-options', f'train_cfg.max_epochs={epochs}',
         f'train_cfg.val_interval={epochs}', f'param_scheduler.T_max={epochs}',
         f'randomness.seed={seed}', *data_options(root), *options],
        osp.join(work, 'train.log'))
    ckpt = osp.join(work, f'epoch_{epochs}.pth')
    out = osp.join(work, 'test_metrics.json')
    run_tool([osp.join(tools, 'test.py'), config, ckpt, '--work-dir', work,
              '--out', out, '--cfg-options', *data_options(root),
              *[o for o in options if not o.startswith('load_from=')]],
             osp.join(work, 'test.log'))
    with open(out) as f:
        return json.load(f), ckpt, seconds


def recorded_run(tools, config, work, seed, options, root) -> dict:
    """tools/train.py (no validation) then tools/test.py of ``config`` in
    ``work``, both with ``options`` (``load_from`` only for training);
    the record ``work/run.json`` (settings, metrics, checkpoint, training
    seconds) is returned, and reused when it records the same config
    (relative to ``root``), seed and options and its checkpoint exists."""
    record = osp.join(work, 'run.json')
    settings = dict(config=osp.relpath(config, root), seed=seed,
                    options=list(options))
    if osp.isfile(record):
        with open(record) as f:
            last = json.load(f)
        if last['settings'] == settings and osp.isfile(last['checkpoint']):
            return last
    os.makedirs(work, exist_ok=True)
    if osp.exists(record):
        os.remove(record)
    seconds = run_tool(
        [osp.join(tools, 'train.py'), config, '--work-dir', work,
         '--cfg-options', f'randomness.seed={seed}', *options,
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None'],
        osp.join(work, 'train.log'))
    with open(osp.join(work, 'last_checkpoint')) as f:
        ckpt = f.read().strip()
    out = osp.join(work, 'test_metrics.json')
    test_options = [o for o in options if not o.startswith('load_from=')]
    run_tool([osp.join(tools, 'test.py'), config, ckpt, '--work-dir', work,
              '--out', out] + (['--cfg-options', *test_options]
                               if test_options else []),
             osp.join(work, 'test.log'))
    with open(out) as f:
        metrics = json.load(f)
    result = dict(settings=settings, metrics=metrics, checkpoint=ckpt,
                  seconds=seconds)
    atomic_write_json(record, result)
    return result


def evaluated_search(out):
    """The ``search.json`` of a tools/search_subnet.py run in ``out`` once
    its evaluation finished, else None (the tool writes it first without
    metrics, so a failed evaluation keeps the search)."""
    path = osp.join(out, 'search.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        content = json.load(f)
    return content if 'metrics' in content else None
