"""Switch a converted model between bit-widths, globally or per layer.

A model's bit is state of its modules, shared by every thread: ``use_bits``
holds a lock of the model for its whole block (``set_bits`` and
``set_layer_bits`` take it too), so threads that each run their forward
inside ``use_bits`` (a server answering at several bits) serialize and each
gets its own bit. A forward outside ``use_bits`` while another thread
switches has no such guard.

Switching calls each quantized module's ``set_bit`` (one attribute write):
no pass over weights.
"""
import contextlib
import threading
import weakref
from typing import Dict, Iterator, Mapping, Tuple, Union

from torch import nn

from .bitwidths import check_bit
from .layers import (BitSwitchable, QuantLayer, not_quantized_error,
                     quantized_layers)


_LOCKS = weakref.WeakKeyDictionary()  # model -> its RLock
_LOCKS_GUARD = threading.Lock()


def bits_lock(model: nn.Module) -> threading.RLock:
    """The lock that guards ``model``'s bits (made at first use; kept off
    the module, so a model still deep-copies and pickles)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _switchables(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    found = False
    for name, module in model.named_modules():
        if isinstance(module, BitSwitchable):
            found = True
            yield name, module
    if not found:
        raise not_quantized_error(model)


def model_bits(model: nn.Module) -> tuple:
    """The bit-width list of a converted model (its layers all share one)."""
    for _, module in _switchables(model):
        return module.bits


def set_bits(model: nn.Module, bit: int) -> nn.Module:
    """Run every quantized layer and switchable BN of ``model`` at ``bit``."""
    with bits_lock(model):
        for _, module in _switchables(model):
            module.set_bit(bit)  # the first one refuses a bad bit
    return model


def set_layer_bits(model: nn.Module, layer_bits: Dict[str, int]) -> nn.Module:
    """Give the named quantized layers their own bits (mixed precision).

    A switchable or transitional BN follows the bit of the layer feeding it
    (and, if transitional, the bit of the layer before). Names not given
    keep their current bit.
    """
    layer_bits = check_layer_bits(model, layer_bits)
    layers = quantized_layers(model)
    with bits_lock(model):
        for name, bit in layer_bits.items():
            layers[name].set_bit(bit)
        for _, module in _switchables(model):
            source = layers.get(getattr(module, 'source', None))
            previous = layers.get(getattr(module, 'previous', None))
            if previous is not None:  # transitional: (previous, source)
                module.set_bit(module.bit if source is None else source.bit,
                               previous.bit)
            elif source is not None:
                module.set_bit(source.bit)
    return model


def check_layer_bits(model: nn.Module, layer_bits,
                     source: str = 'layer_bits') -> Dict[str, int]:
    """``layer_bits`` (quantized layer name -> bit, a SubNet) with plain int
    bits, after checking that every name is a quantized layer of ``model``
    and every bit one of its bits; errors name ``source``."""
    if not isinstance(layer_bits, Mapping):
        raise TypeError(f'{source} must map quantized layer names to bits, '
                        f'got {layer_bits!r}')
    layers = quantized_layers(model, required=True)
    checked = {}
    for name, bit in layer_bits.items():
        if name not in layers:
            last = str(name).split('.')[-1]
            close = [n for n in layers if n.endswith(last)][:3]
            raise KeyError(
                f'{source}: layer {name!r} is not a quantized layer of '
                f'{type(model).__name__}'
                + (f' (similar: {close})' if close else ''))
        checked[name] = check_bit(bit, layers[name].bits,
                                  f'{source}[{name!r}]')
    return checked


def get_bits(model: nn.Module) -> Dict[str, int]:
    """Current bit of every quantized layer, by module name."""
    return {name: m.bit for name, m in _switchables(model)
            if isinstance(m, QuantLayer)}


@contextlib.contextmanager
def use_bits(model: nn.Module, bits: Union[int, Dict[str, int]]):
    """Run ``model`` at ``bits`` (one int, or per-layer) inside the block and
    restore every module's previous bit afterwards; other threads' bit
    switches of ``model`` wait until the block ends."""
    with bits_lock(model):
        saved = [(m, m.bit, getattr(m, 'prev_bit', None))
                 for _, m in _switchables(model)]
        try:
            if isinstance(bits, dict):
                set_layer_bits(model, bits)
            else:
                set_bits(model, bits)
            yield model
        finally:
            for module, bit, prev_bit in saved:
                if prev_bit is None:
                    module.set_bit(bit)
                else:
                    module.set_bit(bit, prev_bit)


@contextlib.contextmanager
def use_setting(model: nn.Module, setting: Union[int, Dict[str, int]]):
    """``use_bits`` for a *setting* of the per-setting loops and the
    export: one bit, or a SubNet whose unnamed layers (and the BNs that
    follow no layer) run at the highest bit, whatever bit the model was
    at."""
    with contextlib.ExitStack() as stack:
        if isinstance(setting, dict):
            stack.enter_context(use_bits(model, model_bits(model)[0]))
        stack.enter_context(use_bits(model, setting))
        yield model
