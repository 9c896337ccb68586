"""The optional parts of the per-bit train step, each one plugin.

``multi_bit_train_step`` walks the bits and calls every plugin the wrapper
lists (``MultiPrecisionQAT.step_plugins``): around the iteration
(``iteration``), after a bit is set (``before_bit``: log values), instead of
the plain forward (``losses``: the first plugin that computes them) and
after it (``after_losses``), and at the end (``after_iteration``). The FP32
teacher of ``fp_distill`` is one too (fp_distill.py).
"""
import contextlib
from typing import Callable, Dict, Optional

import torch

from mmdrq.quantization import recording_calls, shared_rounding
from .pskd import soft_cross_entropy


class StepPlugin:
    """Does nothing at every point; a plugin overrides the ones it needs."""

    def iteration(self, module, data):
        """A context around all bits of one iteration (``data`` is
        preprocessed)."""
        return contextlib.nullcontext()

    def before_bit(self, module, bit: int) -> Dict[str, torch.Tensor]:
        """After ``set_bits(bit)``: values to log for this bit."""
        return {}

    def losses(self, module, forward: Callable, data,
               bit: int) -> Optional[dict]:
        """The bit's losses in place of ``forward(data, mode='loss')``."""
        return None

    def after_losses(self, module, bit: int, losses: dict) -> dict:
        return losses

    def after_iteration(self, module):
        """After every bit, the weights restored to the highest bit."""


class SharedRoundingStep(StepPlugin):
    """``loss_mode='sum'``: the weights stay put across the bits' forwards,
    so each weight is rounded once for all bits."""

    def iteration(self, module, data):
        return shared_rounding(module.architecture)


class CallRecordingStep(StepPlugin):
    """The first training step records which quantized layers ran; the
    wrapper then warns about the others (their owners read the weight
    directly)."""

    def __init__(self):
        self.called = None

    def iteration(self, module, data):
        if module.uncalled_layers is not None:
            return contextlib.nullcontext()
        return _keep_called(self, module.architecture)

    def after_iteration(self, module):
        if self.called is not None:
            module.note_called_layers(self.called)
            self.called = None


@contextlib.contextmanager
def _keep_called(plugin: CallRecordingStep, architecture):
    with recording_calls(architecture) as called:
        plugin.called = called
        yield


class HeadDistillStep(StepPlugin):
    """The lower bits learn the highest bit's head outputs of the same
    iteration (``HeadDistill``)."""

    def __init__(self, distill):
        self.distill = distill

    def iteration(self, module, data):
        return self.distill.capturing()

    def after_losses(self, module, bit, losses):
        if bit == module.bits[0]:
            self.distill.keep_teacher()
        else:
            losses['loss_distill'] = self.distill.loss()
        return losses


class PSKDStep(StepPlugin):
    """PS-KD: every bit learns soft targets made from the highest bit's
    predictions of the previous epoch, instead of the head's loss."""

    def __init__(self, targets):
        self.tables = targets  # PSKDTargets: a module of the wrapper
        self.targets = None

    def iteration(self, module, data):
        labels = torch.cat([s.gt_label for s in data['data_samples']])
        self.targets = self.tables.targets(labels, sample_index(data))
        return contextlib.nullcontext()

    def losses(self, module, forward, data, bit):
        logits = forward(data, mode='tensor')
        if bit == module.bits[0]:
            self.tables.record(logits, sample_index(data))
        return dict(loss=soft_cross_entropy(logits, self.targets))


class BitSamplingStep(StepPlugin):
    """HASB mixed precision: each forward's per-layer bits are drawn around
    the global bit; the realised average bit is logged."""

    def before_bit(self, module, bit):
        avg = module.bit_sampler.apply(module.architecture, bit)
        return {'avg_bit': torch.tensor(avg)}


def sample_index(data) -> torch.Tensor:
    return torch.tensor([s.sample_idx for s in data['data_samples']])
