"""Integer checkpoints: the quantized layers as INT-h plus scales.

What a deployed model needs: every lower bit is re-derived from the stored
integers, so the file holds no FP copy of a quantized layer's weight. The
rest of the state dict (activation scales, per-bit BN, FP layers, biases) is
kept as it is, and the metadata lets a load refuse another model or bit set.
"""
import pickle
import zipfile

import torch
from torch import nn

from mmdrq.quantization.bit_control import set_layer_bits
from mmdrq.quantization.layers import _QuantLayer, quantized_layers
from mmdrq.utils import atomic_torch_save
from mmdrq.version import __version__
from .packing import pack, storage_of, unpack

FORMAT = 'mmdrq-int'
FORMAT_VERSION = 1


def _quant_layers(model: nn.Module):
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no mmdrq quantized '
                         'layers: call mmdrq.quantize_model first')
    return layers


def _layer_options(module: _QuantLayer) -> dict:
    quantizer = module.weight_quantizer
    return dict(variant=quantizer.variant, rounding=quantizer.rounding,
                per_channel=quantizer.per_channel)


def _signature(model: nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def save_int(model: nn.Module, path: str, layer_bits=None) -> dict:
    """Write ``model``'s integer checkpoint to ``path`` atomically.

    ``layer_bits`` (a SubNet: layer name -> bit) is recorded, and
    ``load_int`` switches the model to it; the integers stay INT-h, so every
    other SubNet remains derivable from the same file.

    Returns the size breakdown in bytes: ``int_bytes`` (packed integers),
    ``scale_bytes`` and ``fp32_bytes`` (the same layers' FP32 weights).
    """
    layers = _quant_layers(model)
    state = model.state_dict()
    int_weights, sizes = {}, dict(int_bytes=0, scale_bytes=0, fp32_bytes=0)
    for name, module in layers.items():
        quantizer = module.weight_quantizer
        if quantizer.variant == 'unshared':
            raise ValueError(
                f'layer {name!r} uses variant=\'unshared\': its bits have '
                'independent scales and cannot be derived from one set of '
                'integers; integer export needs double_rounding or floor')
        h = quantizer.stored_bit
        data = pack(quantizer.integers(module.weight).cpu(), h)
        scale = quantizer.scale.detach().cpu().clone()
        int_weights[name] = dict(data=data, shape=list(module.weight.shape),
                                 scale=scale, storage=storage_of(h))
        state.pop(name + '.weight')
        state.pop(name + '.weight_quantizer.scale')
        sizes['int_bytes'] += data.numel() * data.element_size()
        sizes['scale_bytes'] += scale.numel() * scale.element_size()
        sizes['fp32_bytes'] += module.weight.numel() * 4
    first = next(iter(layers.values()))
    if layer_bits is not None:
        unknown = sorted(set(layer_bits) - set(layers))
        if unknown:
            raise KeyError(f'SubNet names layers the model lacks: {unknown}')
        bad = {n: b for n, b in layer_bits.items() if b not in first.bits}
        if bad:
            raise ValueError(f'SubNet bits {bad} are not in the model\'s '
                             f'bits {list(first.bits)}')
        layer_bits = {n: int(b) for n, b in layer_bits.items()}
    meta = dict(layer_bits=layer_bits,
        format=FORMAT, format_version=FORMAT_VERSION,
        mmdrq_version=__version__, bits=list(first.bits),
        options=_layer_options(first), model=type(model).__name__,
        signature=_signature(model))
    atomic_torch_save(
        dict(meta=meta, int_weights=int_weights,
             state_dict={k: v.detach().cpu() for k, v in state.items()}),
        path)
    return sizes


def _read(path: str) -> dict:
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    # torch's readers fail on damaged files in many ways: a truncated zip
    # gives OSError(EINVAL), a text file KeyError from the safe unpickler
    except (RuntimeError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, AttributeError, TypeError) as e:
        raise ValueError(f'{path!r} is not a readable mmdrq integer '
                         f'checkpoint (truncated or corrupt?): {e}') from e
    if not isinstance(payload, dict) or \
            not isinstance(payload.get('meta'), dict) or \
            payload['meta'].get('format') != FORMAT:
        raise ValueError(f'{path!r} is not an mmdrq integer checkpoint '
                         f'(no meta.format == {FORMAT!r})')
    return payload


def is_int_checkpoint(path: str) -> bool:
    """Whether ``path`` is a readable mmdrq integer checkpoint (by its
    metadata, loaded with ``weights_only=True``)."""
    try:
        _read(path)
    except ValueError:
        return False
    return True


def load_int(model: nn.Module, path: str) -> nn.Module:
    """Load an integer checkpoint into a converted ``model`` of the same
    architecture and bit list; outputs then equal the saved model's at every
    bit, bit for bit."""
    payload = _read(path)
    meta = payload['meta']
    if meta.get('format_version') != FORMAT_VERSION:
        raise ValueError(f'{path!r} has format_version='
                         f'{meta.get("format_version")}, this mmdrq reads '
                         f'{FORMAT_VERSION}')
    layers = _quant_layers(model)
    first = next(iter(layers.values()))
    if list(first.bits) != meta['bits']:
        raise ValueError(f'{path!r} was saved with bits={meta["bits"]}, the '
                         f'model has bits={list(first.bits)}')
    if _layer_options(first) != meta['options']:
        raise ValueError(f'{path!r} was saved with quantizer options '
                         f'{meta["options"]}, the model has '
                         f'{_layer_options(first)}')
    expected = dict((k, shape) for k, shape in meta['signature'])
    actual = dict((k, shape) for k, shape in _signature(model))
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            raise ValueError(
                f'{path!r} is from another model ({meta["model"]}): state '
                f'key {key!r} has shape {expected.get(key)} in the file and '
                f'{actual.get(key)} in {type(model).__name__} '
                '(None = missing)')
    state = dict(payload['state_dict'])
    for name, entry in payload['int_weights'].items():
        module = layers[name]
        h = module.weight_quantizer.stored_bit
        q = unpack(entry['data'], h, entry['shape']).float()
        scale = entry['scale']
        view = scale[0].view(-1, *([1] * (q.dim() - 1))) \
            if module.weight_quantizer.per_channel else scale[0]
        # q * s re-rounds to q exactly: |q| < 2**15 keeps the float error
        # far below half a step.
        state[name + '.weight'] = q * view
        state[name + '.weight_quantizer.scale'] = scale
    model.load_state_dict(state, strict=True)
    if meta.get('layer_bits'):
        set_layer_bits(model, meta['layer_bits'])
    return model
