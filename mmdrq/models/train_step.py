"""The per-bit train step of one-shot multi-precision QAT, shared by the
plain and the DDP wrapper: a loop over the scheduled bits that calls the
wrapper's step plugins (step_plugins.py)."""
import abc
import contextlib
from collections import OrderedDict
from typing import Callable, Dict

import torch
from mmengine.optim import OptimWrapper

from mmdrq.quantization import set_bits
from mmdrq.quantization.bitwidths import bit_tag


class PerBitOptimWrapper(abc.ABC):
    """What the per-bit train step asks of an optimizer wrapper that treats
    bits differently (ALRS): told each bit before its step, and given the
    per-bit losses of ``loss_mode='sum'``. Plain wrappers get neither."""
    bits: tuple

    @abc.abstractmethod
    def set_bit(self, bit: int):
        """The bit whose gradients the next ``update_params`` steps."""

    @abc.abstractmethod
    def update_summed_params(self, losses: Dict[int, torch.Tensor]):
        """One step on the per-bit losses ``{bit: loss}`` of one iteration."""


def check_optim_bits(optim_bits, model_bits):
    """The optimizer wrapper's bits must be the model's (ALRS's rates are
    per bit)."""
    if tuple(optim_bits) != tuple(model_bits):
        raise ValueError(f'optim_wrapper.bits={list(optim_bits)} differs '
                         f'from the quantizer bits={list(model_bits)}')


def multi_bit_train_step(module, forward: Callable, data,
                         optim_wrapper: OptimWrapper) -> Dict:
    """One iteration of ``module`` (a ``MultiPrecisionQAT``) over the bits
    its schedule gives.

    ``forward(data, mode)`` runs the (possibly DDP-wrapped) model; the data
    is preprocessed once for all bits. A ``PerBitOptimWrapper`` (ALRS) is
    told the bit before each step; with the summed loss, its
    ``update_summed_params`` gets the per-bit losses (the per-bit rates
    then weigh each bit's gradient).
    """
    per_bit = isinstance(optim_wrapper, PerBitOptimWrapper)
    if getattr(optim_wrapper, 'bits', None) is not None:  # any that has them
        check_optim_bits(optim_wrapper.bits, module.bits)
    with optim_wrapper.optim_context(module):
        data = module.data_preprocessor(data, True)
    plugins = module.step_plugins()
    log_vars, total, bit_losses, bit_values = OrderedDict(), 0, {}, {}
    try:
        with contextlib.ExitStack() as stack:
            for plugin in plugins:
                stack.enter_context(plugin.iteration(module, data))
            for bit in module.bit_schedule.current_bits():
                set_bits(module.architecture, bit)
                for plugin in plugins:
                    log_vars.update((k + bit_tag(bit), v) for k, v in
                                    plugin.before_bit(module, bit).items())
                with optim_wrapper.optim_context(module):
                    losses = _bit_losses(module, plugins, forward, data, bit)
                for plugin in plugins:
                    losses = plugin.after_losses(module, bit, losses)
                loss, bit_vars = module.parse_losses(losses)
                if bit in module.bit_loss_weights:
                    loss = loss * module.bit_loss_weights[bit]
                log_vars.update(
                    (k + bit_tag(bit), v) for k, v in bit_vars.items())
                bit_values[bit] = bit_vars['loss']
                if module.loss_mode == 'per_bit':
                    if per_bit:
                        optim_wrapper.set_bit(bit)
                    optim_wrapper.update_params(loss)
                    total = total + loss.detach()
                else:
                    bit_losses[bit] = loss
                    total = total + loss
    finally:
        set_bits(module.architecture, module.bits[0])
    module.bit_schedule.record(bit_values)
    for plugin in plugins:
        plugin.after_iteration(module)
    if module.loss_mode == 'sum':
        if per_bit:
            optim_wrapper.update_summed_params(bit_losses)
        else:
            optim_wrapper.update_params(total)
        total = total.detach()
    log_vars['loss'] = total
    return log_vars


def _bit_losses(module, plugins, forward: Callable, data, bit: int) -> dict:
    """The losses of the plugin that computes them (PS-KD), else the
    model's own."""
    for plugin in plugins:
        losses = plugin.losses(module, forward, data, bit)
        if losses is not None:
            return losses
    return forward(data, mode='loss')
