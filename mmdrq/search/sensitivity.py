"""Measured sensitivity: the loss increase of each layer alone at each bit.

The trace objectives predict a layer's cost from second-order theory; this
one measures it. With every other layer at the highest bit, layer l runs at
bit b on a few calibration batches, and the model's own loss minus the
loss at the highest bit is that (layer, bit)'s cost. The SubNet search then
minimises the sum of the chosen costs (``ilp`` objective ``measured``, a
deviation from the paper; docs/mixed_precision.md). It needs no traces,
and it sees what a second-order expansion does not: activations' error,
clipping, and the SuperNet's per-bit BN.
"""
import os.path as osp
from typing import Dict, Iterable

import torch
from mmengine.model import is_model_wrapper
from torch import nn

from mmdrq.models import architecture_of
from mmdrq.quantization.bit_control import model_bits, use_setting
from mmdrq.quantization.layers import quantized_layers
from mmdrq.utils.json_files import read_json
from .calibration import model_loss, without_batch_augments


@torch.no_grad()
def loss_increases(model: nn.Module, batches: Iterable
                   ) -> Dict[str, Dict[int, float]]:
    """``{layer: {bit: mean loss with the layer alone at bit - mean loss at
    the highest bit}}`` for every quantized layer of ``model`` (an
    OpenMMLab model or mmdrq's ``MultiPrecisionQAT``, not a DDP wrapper),
    the mean over ``batches`` of its dataloader (each batch's loss counts
    once). Eval mode: BN uses each bit's running statistics, so every
    setting is the same function of the same images (0 at the highest bit
    by construction). Batches are preprocessed per setting, on the model's
    device, rather than kept preprocessed."""
    if is_model_wrapper(model):
        raise TypeError(f'loss_increases takes the model itself, not a '
                        f'{type(model).__name__}: pass its .module')
    arch = architecture_of(model)
    layers = quantized_layers(arch, required=True)
    highest = model_bits(arch)[0]
    batches = list(batches)
    if not batches:
        raise ValueError('batches is empty: no loss to measure')
    def mean_loss(setting) -> float:
        with use_setting(arch, setting):
            return sum(float(model_loss(model, model.data_preprocessor(
                batch, True))) for batch in batches) / len(batches)

    was_training = model.training
    model.eval()
    try:
        with without_batch_augments(model.data_preprocessor):
            base = mean_loss(highest)
            return {name: {bit: 0.0 if bit == highest else
                           mean_loss({name: bit}) - base
                           for bit in layer.bits}
                    for name, layer in layers.items()}
    finally:
        model.train(was_training)


def monotone(increases: Dict[str, Dict[int, float]]
             ) -> Dict[str, Dict[int, float]]:
    """Each layer's increases made non-increasing in the bit: from the
    highest bit down, a bit costs at least what every higher one does (so
    nothing is below the highest bit's 0). A lower bit measured as cheaper
    is calibration noise, and the search would take it for free: on digits
    the raw increases put layers at 2 bits even at budgets near 8."""
    result = {}
    for name, by_bit in increases.items():
        floor, result[name] = 0.0, {}
        for bit in sorted(by_bit, reverse=True):
            floor = max(floor, by_bit[bit])
            result[name][bit] = floor
    return result


def load_increases(path: str, checkpoint: str, model: nn.Module
                   ) -> Dict[str, Dict[int, float]]:
    """The raw ``measured_loss_increases`` of an earlier measured search's
    ``search.json``, to search again (another budget kind) without
    measuring again. Refused unless they were measured on ``checkpoint``
    (same real path) for every quantized layer and bit of ``model``."""
    source = f'--increases {path!r}'
    content = read_json(path, source)
    if not isinstance(content, dict) or not isinstance(
            content.get('measured_loss_increases'), dict):
        raise ValueError(f'{source} holds no measured_loss_increases: give '
                         'the search.json of a measured search')
    if content.get('checkpoint') != osp.realpath(checkpoint):
        raise ValueError(f'{source} was measured on checkpoint '
                         f'{content.get("checkpoint")!r}, not '
                         f'{osp.realpath(checkpoint)!r}')
    layers = quantized_layers(architecture_of(model), required=True)
    try:
        increases = {name: {int(bit): float(value)
                            for bit, value in by_bit.items()} for name, by_bit
                     in content['measured_loss_increases'].items()}
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f'{source}: measured_loss_increases must map each '
                         f'layer to {{bit: number}} ({e})') from None
    expected = {name: sorted(layer.bits) for name, layer in layers.items()}
    got = {name: sorted(by_bit) for name, by_bit in increases.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or sorted(
            n for n in got if got[n] != expected[n])
        raise ValueError(f'{source} does not match this model\'s quantized '
                         f'layers and bits (e.g. {differ[:3]})')
    return increases
