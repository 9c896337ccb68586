"""BN statistics re-estimated for one setting (a bit or a SubNet) before it
is evaluated.

A SubNet mixes bits that no training forward ran together: HASB draws each
layer's bit at random, so each BN's running statistics (one per pair of bits
with transitional BN) average inputs from many neighbours' bits, not the
SubNet's. Re-estimating them on a few training batches with the SubNet's
own bits (as weight-sharing NAS does for its sampled subnets, e.g. BigNAS)
gives every BN the statistics of what it normalises. The statistics are put
back after the setting: the checkpoint's model is unchanged.
"""
import contextlib
import itertools
import random
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.utils.checks import check_int, check_keys


def check_bn_calibration(cfg, key: str):
    """``cfg`` (``None`` or ``dict(batches=N)``) checked; the number of
    batches, or 0 for none."""
    if cfg is None:
        return 0
    if not isinstance(cfg, dict):
        raise ValueError(f'{key} must be None or dict(batches=N), got '
                         f'{cfg!r}')
    check_keys(key, cfg, ('batches', ))
    return check_int(f'{key}.batches', cfg.get('batches', 0), minimum=1)


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, NumPy's and torch's CPU random draws seeded with ``seed``
    inside the block (the same data augmentation on every entry), the
    caller's random state restored after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def calibrated_bn(model: nn.Module, batches: Iterable, num_batches: int,
                  forward: Callable[[object], object], seed: int = 0):
    """Within the block, every BN layer of ``model`` holds the statistics of
    ``forward(batch)`` over the first ``num_batches`` of ``batches`` (an
    equal-weight average: momentum None), run without gradients and with
    the rest of the model in eval mode, the random draws of loading them
    (augmentation) seeded with ``seed``; each BN's buffers and momentum are
    restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m, m.momentum, {k: b.clone() for k, b in m.named_buffers(
        recurse=False)}) for m in norms]
    training = model.training
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        with torch.no_grad(), seeded(seed):
            for batch in itertools.islice(batches, num_batches):
                forward(batch)
                seen += 1
        if not seen:
            raise ValueError('BN calibration got no batches: its '
                             'dataloader is empty')
        for m in norms:
            m.eval()
        yield model
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
        model.train(training)
