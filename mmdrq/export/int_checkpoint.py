"""Integer checkpoints: the quantized layers as INT-h plus scales.

What a deployed model needs: every lower bit is re-derived from the stored
integers, so the file holds no FP copy of a quantized layer's weight (but
for layers that standardize or normalize it before use: their integers do
not give the parameter back, so it is kept as it is). The
rest of the state dict (activation scales, per-bit BN, FP layers, biases) is
kept as it is, and the metadata lets a load refuse another model or bit set.
"""
import pickle
import warnings
import zipfile

import torch
from torch import nn

from mmdrq.quantization.bit_control import check_layer_bits, set_layer_bits
from mmdrq.quantization.integers import uninitialised_quantizers
from mmdrq.quantization.layers import quantized_layers
from mmdrq.quantization.meta import check_quantizer_meta, quantizer_meta
from mmdrq.utils import (UnsafeCheckpointError, atomic_torch_save,
                         load_weights_only)
from mmdrq.utils.digest import first_changed, tensor_digests
from mmdrq.version import __version__
from .packing import pack, storage_of, unpack

FORMAT = 'mmdrq-int'
FORMAT_VERSION = 1
DIGESTS = 'tensor_sha256'  # tensor name -> SHA-256
META_KEYS = ('bits', 'options', 'model', 'signature')


def _payload_tensors(payload: dict) -> dict:
    """Every tensor of ``int_weights`` and ``state_dict``, by a name."""
    tensors = {f'state_dict.{k}': v for k, v in payload['state_dict'].items()}
    for name, entry in payload['int_weights'].items():
        tensors.update({f'int_weights.{name}.{k}': entry[k]
                        for k in ('data', 'scale')})
    return tensors


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
    never_run = {name: missing for name, module in
                 quantized_layers(model).items()
                 if (missing := uninitialised_quantizers(module))}
    if never_run:
        warnings.warn(f'{path!r}: {len(never_run)} quantized layers were '
                      'never run, their quantizer scales are placeholders '
                      f'(e.g. {dict(list(never_run.items())[:3])}): train '
                      'or calibrate the model before exporting it')
    layers = _integer_layers(model)
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
        weight = module.weight_to_quantize()
        data = pack(quantizer.integers(weight).cpu(), h)
        scale = quantizer.scale.detach().cpu().clone()
        int_weights[name] = dict(data=data, shape=list(weight.shape),
                                 scale=scale, storage=storage_of(h))
        state.pop(name + '.' + module.weight_name)
        state.pop(name + '.weight_quantizer.scale')
        sizes['int_bytes'] += data.numel() * data.element_size()
        sizes['scale_bytes'] += scale.numel() * scale.element_size()
        sizes['fp32_bytes'] += weight.numel() * 4
    if layer_bits is not None:
        layer_bits = check_layer_bits(model, layer_bits, 'SubNet')
    meta = dict(layer_bits=layer_bits,
        format=FORMAT, format_version=FORMAT_VERSION,
        mmdrq_version=__version__, **quantizer_meta(model),
        model=type(model).__name__, signature=_signature(model))
    payload = dict(meta=meta, int_weights=int_weights,
                   state_dict={k: v.detach().cpu() for k, v in state.items()})
    meta[DIGESTS] = tensor_digests(_payload_tensors(payload).items())
    atomic_torch_save(payload, path)
    return sizes


def _read(path: str) -> dict:
    try:
        payload = load_weights_only(path, map_location='cpu')
    except (FileNotFoundError, IsADirectoryError, PermissionError,
            UnsafeCheckpointError):
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
    lacking = [f'meta.{k}' for k in META_KEYS if k not in meta] + [
        k for k in ('int_weights', 'state_dict')
        if not isinstance(payload.get(k), dict)]
    if lacking:
        raise ValueError(f'{path!r} lacks {lacking}: an incomplete mmdrq '
                         'integer checkpoint (edited by hand?)')
    layers = _integer_layers(model)
    check_quantizer_meta(dict(bits=meta['bits'], options=meta['options']),
                         model, repr(path))
    _check_shapes(dict((k, shape) for k, shape in meta['signature']), model,
                  f'{path!r} is from another model ({meta["model"]})')
    _check_int_weights(payload['int_weights'], layers, path)
    state = dict(payload['state_dict'])
    for name, entry in payload['int_weights'].items():
        module = layers[name]
        h = module.weight_quantizer.stored_bit
        q = unpack(entry['data'], h, entry['shape']).float()
        scale = entry['scale']
        view = module.weight_quantizer.scale_view(q.dim(), 0, scale)
        # q * s re-rounds to q exactly: |q| < 2**15 keeps the float error
        # far below half a step.
        state[name + '.' + module.weight_name] = \
            module.from_channel_major(q * view)
        state[name + '.weight_quantizer.scale'] = scale
    _check_shapes({k: list(v.shape) for k, v in state.items()}, model,
                  f'{path!r} does not hold what its signature says')
    # after the checks that name an edit
    if isinstance(meta.get(DIGESTS), dict):
        changed = first_changed(meta[DIGESTS], _payload_tensors(payload))
        if changed is not None:
            raise ValueError(f'{path!r}: tensor {changed!r} does not match '
                             'the SHA-256 in its metadata: the file is '
                             'damaged; export it again (tools/export_int.py)')
    else:
        warnings.warn(f'{path!r} has no tensor digests (written by an older '
                      'mmdrq): its bytes are not checked')
    model.load_state_dict(state, strict=True)
    if meta.get('layer_bits'):
        set_layer_bits(model, meta['layer_bits'])
    return model


def _integer_layers(model: nn.Module) -> dict:
    """The quantized layers whose integers give their parameter back (not
    those that standardize or normalize it first: those keep the FP
    parameter in the file), by name."""
    return {name: module for name, module in
            quantized_layers(model, required=True).items()
            if module.integer_weight}


def _check_shapes(expected: dict, model: nn.Module, problem: str):
    """Raise ``problem`` with the first state key whose shape (None:
    missing) differs between ``expected`` and ``model``."""
    actual = dict((k, shape) for k, shape in _signature(model))
    for key in sorted(set(expected) | set(actual)):
        if expected.get(key) != actual.get(key):
            raise ValueError(
                f'{problem}: state key {key!r} has shape {expected.get(key)} '
                f'in the file and {actual.get(key)} in '
                f'{type(model).__name__} (None = missing)')


def _check_int_weights(int_weights: dict, layers: dict, path: str):
    """Every quantized layer, and only those, with packed integers and a
    scale of its own shapes."""
    extra = sorted(set(int_weights) - set(layers))
    missing = [name for name in layers if name not in int_weights]
    if extra or missing:
        found = [f'{what} {names}' for what, names in (
            ('integer weights of layers the model lacks:', extra),
            ("no integer weights of the model's layers", missing)) if names]
        raise ValueError(f'{path!r} has ' + ' and '.join(found))
    for name, module in layers.items():
        entry = int_weights[name]
        if not isinstance(entry, dict) or \
                any(k not in entry for k in ('data', 'shape', 'scale')):
            raise ValueError(f'{path!r}: int_weights[{name!r}] must be a dict '
                             f"with 'data', 'shape' and 'scale'")
        bit = module.weight_quantizer.stored_bit
        shape = list(module.weight_to_quantize().shape)
        packed = pack(torch.zeros(shape, dtype=torch.int32), bit)
        scale = module.weight_quantizer.scale
        for key, value, want in (
                ('shape', entry['shape'], shape),
                ('data', _describe(entry['data']), _describe(packed)),
                ('scale', _describe(entry['scale']), _describe(scale))):
            if value != want:
                raise ValueError(
                    f'{path!r}: layer {name!r} has {key} {value}, the model '
                    f'needs {want} (INT{bit}; truncated or edited?)')


def _describe(value):
    """dtype and shape of a tensor (anything else as it is)."""
    if isinstance(value, torch.Tensor):
        return f'{str(value.dtype).replace("torch.", "")}{list(value.shape)}'
    return repr(value)
