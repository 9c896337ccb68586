"""Refuse a checkpoint that does not fit the model exactly, before loading.

MMEngine loads ``load_from`` and ``resume`` checkpoints non-strictly: missing,
unexpected or misshaped weights only log a warning, so a checkpoint of
another model, of another bit list or an FP32 one would be tested with random
or wrong weights. Testing, resuming, exporting and searching need the weights
as they were trained; only ``load_from`` for training (an FP32 start) loads
loosely.
"""
import re

import torch
from mmengine.hooks import Hook
from mmengine.runner import find_latest_checkpoint
from torch import nn

from mmdrq.models import unwrap_model
from mmdrq.models.loading import EXTRA_STATE  # the bits and options
from mmdrq.quantization import quantized_layers
from mmdrq.quantization.meta import check_quantizer_meta, decode_meta
from mmdrq.registry import HOOKS



def check_checkpoint(model: nn.Module, checkpoint, source: str) -> dict:
    """The state dict of ``checkpoint`` (``module.`` prefixes dropped, as
    MMEngine does) after checking that it holds exactly ``model``'s state:
    quantizer state, the same bit list and options, the same keys and
    shapes. Errors name ``source``."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{source} holds no state dict, but a '
                         f'{type(checkpoint).__name__}')
    state = checkpoint.get('state_dict', checkpoint)
    state = {re.sub(r'^module\.', '', k): v for k, v in state.items()}
    expected = model.state_dict()
    if quantized_layers(model) and not any(
            '.weight_quantizer.' in key for key in state):
        raise ValueError(
            f'{source} holds no quantizer state: an FP32 checkpoint, which '
            f'is a start for QAT (load_from in a training config), not a '
            f'trained {type(model).__name__} to test, resume or export')
    if EXTRA_STATE in expected:
        if EXTRA_STATE not in state:
            raise ValueError(
                f'{source} has no {EXTRA_STATE!r} (the bit list and '
                'quantizer options it was trained with): written by an '
                'earlier mmdrq? If you know its bits, tools/'
                'upgrade_checkpoint.py CONFIG CKPT OUT --assume-bits ... '
                'writes a copy that records them')
        check_quantizer_meta(decode_meta(state[EXTRA_STATE]), model, source)
    # MMEngine's load ignores these too (checkpoints of old BN layers)
    missing = [k for k in expected
               if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        found = [f'{len(keys)} {what} (e.g. {keys[:3]})' for what, keys in (
            ('keys missing', missing), ('unexpected keys', unexpected))
            if keys]
        raise ValueError(f'{source} is from another model than the '
                         f'{type(model).__name__} of the config: '
                         + ', '.join(found))
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and \
                value.shape != expected[key].shape:
            raise ValueError(
                f'{source} is from another model than the '
                f'{type(model).__name__} of the config: {key!r} has shape '
                f'{list(value.shape)} in it and '
                f'{list(expected[key].shape)} in the model')
    return state


@HOOKS.register_module()
class StrictLoadHook(Hook):
    """Checks the checkpoint the Runner loads (``load_from`` or resume) with
    ``check_checkpoint`` before MMEngine's non-strict load: tools/test.py and
    a resumed tools/train.py add it."""
    priority = 'VERY_HIGH'  # before hooks that read the checkpoint (EMA)

    def after_load_checkpoint(self, runner, checkpoint: dict):
        model = unwrap_model(runner.model)
        path = runner.cfg.get('load_from') or \
            find_latest_checkpoint(runner.work_dir)
        check_checkpoint(model, checkpoint, f'checkpoint {path!r}')
