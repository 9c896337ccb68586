"""What a converted model's stored state means, saved with it and checked on
load: the bit list and the weight quantizer options that map stored values
to integers. Their state has the same shapes under another bit list (one
weight scale per channel), so without this check a {8,6,4,2} checkpoint
loads into a [4, 2] model and its 8-bit scales serve as 4-bit ones."""
import json

import torch
from torch import nn

from .layers import quantized_layers


def quantizer_meta(model: nn.Module) -> dict:
    """``dict(bits=[...], options=dict(variant, rounding, per_channel))`` of
    ``model``'s quantized layers (they share one conversion config)."""
    layers = quantized_layers(model, required=True)
    first = next(iter(layers.values()))
    quantizer = first.weight_quantizer
    return dict(bits=list(first.bits),
                options=dict(variant=quantizer.variant,
                             rounding=quantizer.rounding,
                             per_channel=quantizer.per_channel))


def encode_meta(meta: dict) -> torch.Tensor:
    """``meta`` as a uint8 tensor of its JSON: a value a state dict can hold
    (MMEngine broadcasts every state dict value as a tensor under DDP)."""
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def decode_meta(value):
    """The dict ``encode_meta`` stored in ``value``, or None."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        return None
    try:
        return json.loads(bytes(value.flatten().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def check_quantizer_meta(saved, model: nn.Module, source: str):
    """Raise a ValueError naming ``source`` and both values if ``saved`` (a
    ``quantizer_meta`` read from a file) is not ``model``'s."""
    expected = quantizer_meta(model)
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise ValueError(f'{source} has no readable mmdrq quantizer meta '
                         f'(expected keys {sorted(expected)}, got {saved!r})')
    if list(saved['bits']) != expected['bits']:
        raise ValueError(f'{source} was saved with bits={list(saved["bits"])}'
                         f', the model has bits={expected["bits"]}')
    if saved['options'] != expected['options']:
        raise ValueError(f'{source} was saved with quantizer options '
                         f'{saved["options"]}, the model has '
                         f'{expected["options"]}')
