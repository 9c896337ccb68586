"""Command-line and config handling shared by the tools."""
import argparse
import os
import os.path as osp

import torch
from torch import nn
from mmengine.config import Config, DictAction

from mmdrq.apis import read_config
from mmdrq.engine.checkpoint_hook import check_testable


def positive_int(text: str) -> int:
    """argparse ``type`` of a count that must be >= 1 (epochs, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an int') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


class CfgOptions(DictAction):
    """MMEngine's ``--cfg-options`` parsing, with an entry that is not
    ``key=value`` named (MMEngine fails on it with an unpacking error)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for value in values:
            if '=' not in value:
                parser.error(f'{option_string} {value!r}: each entry is '
                             'key=value (e.g. model.quantizer.bits=[8,4])')
        super().__call__(parser, namespace, values, option_string)


def add_cfg_options(parser: argparse.ArgumentParser):
    """``--cfg-options key=value ...`` as in every OpenMMLab tool."""
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptions,
                        help='override config settings, key=value')


def add_common_args(parser: argparse.ArgumentParser):
    """--work-dir, --cfg-options, --launcher, --local-rank (as mmdet's)."""
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    add_cfg_options(parser)
    parser.add_argument('--launcher', default='none',
                        choices=['none', 'pytorch', 'slurm', 'mpi'])
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args) -> Config:
    """The config of ``args.config`` with the common args applied; the
    work dir defaults to ``work_dirs/<config name>``."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = read_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    return cfg


def check_out_file(flag: str, out: str, inputs=()) -> None:
    """Refuse, before any work, an output file ``out`` (given by ``flag``)
    whose folder does not exist, that is a folder, or that is one of the
    ``inputs`` (a checkpoint, a config) by any path: writing it would
    replace the input."""
    if not osp.isdir(osp.dirname(osp.abspath(out))):
        raise FileNotFoundError(f'{flag} {out!r}: its folder does not exist')
    if osp.isdir(out):
        raise IsADirectoryError(f'{flag} {out!r} is a folder: give the file '
                                'to write')
    for path in inputs:
        if osp.exists(out) and osp.exists(path) and osp.samefile(out, path):
            raise FileExistsError(
                f'{flag} {out!r} is the input {path!r}: writing it would '
                'replace that file; choose another path')


def check_input_channels(arch: nn.Module, shape):
    """The channels of ``--input-shape`` against the model's first conv,
    before the cost count's forward would fail deep inside it."""
    first = next((m for m in arch.modules() if isinstance(m, nn.Conv2d)),
                 None)
    if first is not None and shape[1] != first.in_channels:
        raise ValueError(
            f'--input-shape {" ".join(map(str, shape))} has {shape[1]} '
            f'channels; the model expects {first.in_channels} (its first '
            f'conv takes {first.in_channels} input channels)')


def is_qat_config(cfg: Config) -> bool:
    """Whether ``cfg.model`` is mmdrq's multi-precision wrapper."""
    return str(cfg.model.get('type', '')).split('.')[-1] == \
        'MultiPrecisionQAT'


def prepare_launch(cfg: Config):
    """Distributed settings that a plain OpenMMLab config lacks.

    An mmdrq model needs its own DDP wrapper (the per-bit loop); on a
    machine without CUDA, DDP runs on gloo with ``device_ids=None``.
    """
    if cfg.launcher == 'none':
        return
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    if is_qat_config(cfg):
        wrapper.setdefault('type', 'mmdrq.MultiPrecisionQATDDP')
    if not torch.cuda.is_available():
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
        cfg.env_cfg.dist_cfg['backend'] = 'gloo'
        wrapper['device_ids'] = None
        _init_cpu_process_group()
    if wrapper:
        cfg.model_wrapper_cfg = wrapper


def finish_launch():
    """End a distributed run with every rank's process group freed, its
    gloo threads joined, before the interpreter exits. Call it after
    ``del runner``: the Runner's DDP reducer holds the group from within
    reference cycles, and while it does, ``destroy_process_group`` leaves
    the backend's threads running into the C ``exit()``, where they raced
    the other rank's exit and aborted a rank now and then ('terminate
    called without an active exception')."""
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()  # the dropped Runner, and the DDP reducer with it
        dist.destroy_process_group()
        gc.collect()


def require_exact_checkpoint(cfg: Config):
    """Make the Runner refuse a checkpoint that does not fit the model
    exactly (``mmdrq.StrictLoadHook``): for testing and resuming, where
    MMEngine's non-strict load would go on with wrong weights."""
    hooks = list(cfg.get('custom_hooks') or [])
    hooks.append(dict(type='mmdrq.StrictLoadHook'))
    cfg.custom_hooks = hooks


def configure_test(cfg: Config, checkpoint: str, bits=None, subnets=None,
                   backend: str = 'pytorch', kernels: str = 'exact',
                   **loop_options):
    """Make ``cfg``'s test run evaluate ``checkpoint`` per setting.

    ``pytorch``: the checkpoint's weights, loaded exactly; an mmdrq model is
    tested by ``MultiBitTestLoop`` at ``bits`` (default: the config's, else
    all) and each ``subnets`` file. ``onnxruntime``: ``checkpoint`` is an
    export folder run by ``OnnxRuntimeTestLoop`` (``subnets``: names).
    ``loop_options`` (e.g. ``measure_speed=True``) go to the loop.
    """
    if backend == 'onnxruntime':
        from mmdrq.deploy.loop import onnxruntime_test_cfg
        onnxruntime_test_cfg(cfg, checkpoint, bits, subnets, kernels)
        cfg.test_cfg.update(loop_options)
        return
    check_testable(checkpoint)
    cfg.load_from = checkpoint
    require_exact_checkpoint(cfg)
    if not is_qat_config(cfg):
        return
    test_cfg = dict(cfg.get('test_cfg') or {}, **loop_options)
    test_cfg['type'] = 'mmdrq.MultiBitTestLoop'
    if bits:
        test_cfg['bits'] = bits
    if subnets:
        test_cfg['subnets'] = subnets
    cfg.test_cfg = test_cfg


def _init_cpu_process_group():
    """MMEngine's pytorch launcher calls torch.cuda.set_device; without a GPU
    the group is started here on gloo, and MMEngine then finds it ready."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
