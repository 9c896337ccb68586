"""Distillation from the FP32 model (``fp_distill``; docs/lowbit.md,
Distillation from the FP32 model): a frozen copy of the float model, loaded
from its checkpoint, runs once per iteration; every bit, the highest
included, adds a loss of its head logits towards the copy's (the
``head_distill`` losses: softmax KL for classifiers and segmentors, sigmoid
KL for single-stage detectors). The copy is kept off the module tree, so
checkpoints, integer files and exports hold the QAT model only."""
import copy
from typing import Optional

import torch
from torch import nn

from mmdrq.utils.checks import check_keys, check_positive
from mmdrq.utils.safe_checkpoint import load_weights_only
from .head_distill import HeadDistill
from .step_plugins import StepPlugin

KEYS = ('checkpoint', 'weight', 'temperature')


class FPDistillStep(StepPlugin):
    """Built from the float architecture before its conversion (the copy),
    then ``attach``-ed to the converted one (the student's hook)."""

    def __init__(self, architecture: nn.Module, checkpoint: str,
                 weight: float = 1.0, temperature: float = 1.0):
        self.weight = check_positive('fp_distill.weight', weight)
        self.temperature = check_positive('fp_distill.temperature',
                                          temperature)
        self.teacher = copy.deepcopy(architecture)
        _load_float(self.teacher, checkpoint)
        self.teacher.eval().requires_grad_(False)
        self.teacher_head = HeadDistill(self.teacher, 'logits')
        self.student = None
        self.targets = None
        self.device = next(self.teacher.parameters()).device

    def attach(self, architecture: nn.Module):
        self.student = HeadDistill(architecture, 'logits',
                                   temperature=self.temperature)

    def iteration(self, module, data):
        inputs = data['inputs']
        if self.device != inputs.device:  # once: the copy is off the tree
            self.device = inputs.device
            self.teacher.to(inputs.device)
        # mode='loss': mmdet's tensor mode calls bbox_head.forward()
        # directly, past the hook; every task's loss calls its head
        with torch.no_grad(), self.teacher_head.capturing():
            self.teacher(inputs, data['data_samples'], mode='loss')
            self.targets = [t.detach() for t in self.teacher_head.outputs()]
        return self.student.capturing()

    def after_losses(self, module, bit, losses):
        losses['loss_fp_distill'] = self.weight * self.student.loss_of(
            self.student.outputs(), self.targets)
        return losses


def _load_float(model: nn.Module, path: str):
    """The float checkpoint's weights into ``model``, every key and shape
    as the model's: a QAT or another model's checkpoint is refused."""
    if not isinstance(path, str) or not path:
        raise ValueError(f'fp_distill.checkpoint must be the path of the '
                         f'FP32 checkpoint, got {path!r}')
    content = load_weights_only(path, map_location='cpu')
    state = content.get('state_dict', content) \
        if isinstance(content, dict) else None
    if not isinstance(state, dict) or any(
            str(k).startswith('architecture.') for k in state):
        raise ValueError(f'fp_distill.checkpoint={path!r} is not an FP32 '
                         'checkpoint of the float model (a QAT checkpoint '
                         'holds architecture.* keys)')
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f'fp_distill.checkpoint={path!r} does not fit the '
                         f'model: {" ".join(str(e).split())[:400]}') from e


def build_fp_distill(architecture: nn.Module,
                     cfg: Optional[dict]) -> Optional[FPDistillStep]:
    """``FPDistillStep`` from the ``fp_distill`` config (None: off); an
    unknown or missing key is an error naming it."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict) or 'checkpoint' not in cfg:
        raise ValueError("fp_distill must be a dict with checkpoint= (the "
                         f"FP32 checkpoint), got {cfg!r}")
    check_keys('fp_distill', cfg, KEYS)
    return FPDistillStep(architecture, **cfg)
