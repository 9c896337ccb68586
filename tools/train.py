"""Train with MMEngine's Runner (same CLI as mmdet's tools/train.py).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
        [--auto-scale-lr] [--cfg-options k=v ...] [--launcher pytorch]
"""
import argparse

from mmengine.runner import Runner

import mmdrq  # noqa: F401 (registers mmdrq's modules, mmdrq:: configs)
from mmdrq.engine import resume_checkpoint
from mmdrq.tools_common import (add_common_args, finish_launch, load_config,
                                prepare_launch, require_exact_checkpoint)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a model')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='enable automatic-mixed-precision training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by total batch / base_batch_size')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from CKPT, or from the checkpoint last_checkpoint in the '
        'work dir names (when it is missing or damaged: the newest complete '
        'one there, with a warning; when there is none: an error)')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if 'ALRS' in wrapper:
            cfg.optim_wrapper.type = 'mmdrq.ALRSAmpOptimWrapper'
        elif wrapper in ('OptimWrapper', 'AmpOptimWrapper'):
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
        else:
            raise ValueError(f'--amp: do not know the AMP form of '
                             f'optim_wrapper.type={wrapper!r}')
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or \
                'base_batch_size' not in cfg.auto_scale_lr:
            raise KeyError('--auto-scale-lr needs auto_scale_lr='
                           'dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == 'auto' else args.resume
    if cfg.get('resume'):
        # MMEngine resumes load_from, else what last_checkpoint names, and
        # trains from scratch when that is missing: choose and check here
        cfg.load_from = resume_checkpoint(cfg.work_dir, cfg.get('load_from'))
        require_exact_checkpoint(cfg)
    prepare_launch(cfg)
    runner = Runner.from_cfg(cfg)
    runner.train()
    del runner  # it holds the process group (finish_launch)
    finish_launch()


if __name__ == '__main__':
    main()
