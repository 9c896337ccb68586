"""Short fine-tuning of one searched SubNet (not in the paper).

The search evaluates SubNets as the SuperNet stores them; a few epochs at
the SubNet's own per-layer bits let its weights, scales and BN adapt to
that one mix. The shared weights move, so the result is that SubNet's own
checkpoint, no longer a SuperNet for every bit (docs/mixed_precision.md).
"""
from typing import Dict

from mmengine.hooks import Hook
from mmengine.logging import print_log
from torch import nn

from mmdrq.models import qat_model_of
from mmdrq.quantization import get_bits
from mmdrq.quantization.bit_control import set_layer_bits
from mmdrq.registry import HOOKS
from mmdrq.search.subnet import load_subnet
from .hasb_hook import HASBHook


class SubNetBits:
    """Stands in for HASB's bit sampler: every training forward runs the
    SubNet's bits, whatever bit the per-bit loop is at."""

    def __init__(self, layer_bits: Dict[str, int]):
        self.layer_bits = layer_bits
        self.average = sum(layer_bits.values()) / len(layer_bits)

    def apply(self, model: nn.Module, bit: int) -> float:
        set_layer_bits(model, self.layer_bits)
        return self.average


@HOOKS.register_module()
class SubNetFineTuneHook(Hook):
    """Trains the SubNet of ``subnet`` (a ``tools/search_subnet.py`` file
    naming every quantized layer) for the run: one step per iteration, so
    the model's ``bit_schedule`` must train one bit per iteration
    (``dict(kind='random', num_sampled=0)``). Not with ``HASBHook``.

    Args:
        subnet: path of the SubNet JSON.
    """
    priority = 'NORMAL'

    def __init__(self, subnet: str):
        if not isinstance(subnet, str):
            raise ValueError(f'SubNetFineTuneHook subnet must be a SubNet '
                             f'file path, got {subnet!r}')
        self.subnet = subnet

    def before_train(self, runner):
        model = qat_model_of(runner.model, 'SubNetFineTuneHook')
        if any(isinstance(hook, HASBHook) for hook in runner.hooks):
            raise ValueError('SubNetFineTuneHook and HASBHook both set the '
                             'per-layer bits: keep one of them in '
                             'custom_hooks')
        schedule = model.bit_schedule
        if (schedule.kind, schedule.num_sampled) != ('random', 0) and \
                len(model.bits) > 1:
            raise ValueError(
                'SubNetFineTuneHook trains one SubNet, one step per '
                "iteration: set model.bit_schedule=dict(kind='random', "
                f"num_sampled=0), got kind={schedule.kind!r}")
        layer_bits = load_subnet(self.subnet, model.architecture)
        missing = sorted(set(get_bits(model.architecture)) - set(layer_bits))
        if missing:
            raise ValueError(f'SubNet file {self.subnet!r} gives no bit for '
                             f'{len(missing)} quantized layers, e.g. '
                             f'{missing[:3]}')
        model.bit_sampler = SubNetBits(layer_bits)
        print_log(f'SubNet fine-tune: {self.subnet}, average bits '
                  f'{model.bit_sampler.average:.2f}', logger='current')

    def after_train(self, runner):
        qat_model_of(runner.model, 'SubNetFineTuneHook').bit_sampler = None
