"""Run the repository's tools as a user does (one subprocess each), for the
digits example and the benchmarks built on it."""
import json
import os
import os.path as osp
import subprocess
import sys
import time


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
