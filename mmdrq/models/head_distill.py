"""In-iteration distillation from the highest bit for detection and
segmentation (docs/lowbit.md, Distillation from the highest bit).

Each training iteration runs the highest bit first; its head outputs (or FPN
features) are kept, detached, and every lower bit adds a loss towards them:
the "inplace distillation" of Yu & Huang, Universally Slimmable Networks
(ICCV 2019), applied to bit-widths rather than widths, and to dense
predictions (per anchor/point sigmoid KL, per pixel softmax KL) rather than
one class distribution per image. The paper's PS-KD (``distill``) is the
classification counterpart.
"""
import contextlib
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmdrq.utils.checks import check_choice, check_keys, check_positive
from .tasks import decode_head, dense_head, task_of

TARGETS = ('logits', 'features')
KEYS = ('target', 'weight', 'temperature', 'box_weight')


def sigmoid_kl(student: torch.Tensor, teacher: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """Elementwise KL(teacher || student) of independent Bernoullis
    ``sigmoid(logit / T)``, summed (detection heads score every class with
    its own sigmoid)."""
    s, t = student / temperature, teacher / temperature
    p = torch.sigmoid(t)
    # log p - log q for both outcomes, in the stable logsigmoid form
    return (p * (F.logsigmoid(t) - F.logsigmoid(s)) +
            (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))).sum()


def box_error(student: torch.Tensor, teacher: torch.Tensor,
              teacher_scores: torch.Tensor) -> torch.Tensor:
    """Summed ``|s - t| / (|t| + 1)`` of one level's box outputs (N, A*4,
    H, W), each anchor's 4 weighted by the teacher's highest class
    probability there (scores N, A*C, H, W): relative, so box codings of
    any scale (FCOS distances in pixels, RetinaNet deltas) weigh alike, and
    background points barely count."""
    n, _, h, w = student.shape
    anchors = student.shape[1] // 4
    weight = teacher_scores.view(n, anchors, -1, h, w).sigmoid().amax(
        2, keepdim=True)
    error = (student - teacher).abs() / (teacher.abs() + 1)
    return (weight * error.view(n, anchors, 4, h, w)).sum()


def softmax_kl(student: torch.Tensor, teacher: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """KL(teacher || student) of ``softmax(logit / T)`` over dim 1, summed
    over every other position (pixels)."""
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum()


class HeadDistill:
    """Keeps the highest bit's outputs of one submodule and gives the loss of
    a lower bit's outputs towards them.

    Args:
        architecture: the converted mmdet or mmseg model.
        target: ``logits``: the dense head's class logits (mmdet
            ``bbox_head``, single stage, sigmoid classifier: per anchor/point
            and class sigmoid KL, summed, divided by the teacher's summed
            probabilities, its soft count of positives) or the
            segmentation logits (mmseg ``decode_head.conv_seg``: per pixel softmax KL,
            mean over pixels), both at temperature T and times T^2;
            ``features``: MSE on every output of the ``neck`` (FPN), mean
            over elements, averaged over levels.
        weight: factor of the loss (``loss_distill``).
        temperature: T of the logits target.
        box_weight: detection ``logits`` only: adds the box outputs'
            ``box_error`` (divided by the same count) times this: at 2 bits
            FCOS loses mostly localisation (mAP75), little mAP50. On the
            low-bit benchmark 1.0 left w2a2 as it was, 5.0 diverged.
    """

    def __init__(self, architecture: nn.Module, target: str = 'logits',
                 weight: float = 1.0, temperature: float = 1.0,
                 box_weight: float = 0.0):
        check_choice('head_distill.target', target, TARGETS)
        check_positive('head_distill.weight', weight)
        check_positive('head_distill.temperature', temperature)
        if isinstance(box_weight, bool) or not isinstance(
                box_weight, numbers.Real) or not 0 <= box_weight < float('inf'):
            raise ValueError(f'head_distill.box_weight must be a number >= 0, '
                             f'got {box_weight!r}')
        self.target, self.weight = target, float(weight)
        self.temperature = float(temperature)
        self.box_weight = float(box_weight)
        self.kind, self.module = self._find_module(architecture)
        if self.box_weight and self.kind != 'det':
            raise ValueError(
                f"head_distill.box_weight={box_weight!r} needs "
                f"target='logits' on a single-stage mmdet detector; "
                f"{type(architecture).__name__} with target={target!r} has "
                f"no box outputs")
        self.teacher = None
        self._captured = None
        self._active = False
        # one hook for good: registering one per step would change the
        # module's hooks, and a compiled model would recompile each time
        self.module.register_forward_hook(self._keep)

    def _find_module(self, model: nn.Module):
        name = type(model).__name__
        if self.target == 'features':
            if getattr(model, 'neck', None) is None:
                raise ValueError(f"head_distill.target='features' needs a "
                                 f"model with a neck (FPN); {name} has none")
            return 'features', model.neck
        if decode_head(model) is not None:
            # mmseg heads call self.forward() (no hooks): hook the classifier
            return 'seg', decode_head(model).conv_seg
        if task_of(model) == 'classification':  # mmpretrain: the logits
            return 'cls', model.head
        head = dense_head(model)
        if head is None:
            raise ValueError(
                f"head_distill.target='logits' needs an mmpretrain "
                f"classifier, a single-stage mmdet detector (bbox_head) or an "
                f"mmseg segmentor (decode_head); {name} is none of them "
                f"(two-stage heads see other proposals at each bit: use "
                f"target='features')")
        if not getattr(head, 'use_sigmoid_cls', False):
            raise ValueError(
                f"head_distill.target='logits' supports sigmoid classifiers "
                f"(use_sigmoid_cls=True); {type(head).__name__} of {name} "
                f"uses softmax: use target='features'")
        return 'det', head

    def _keep(self, module, args, output):
        if self._active:
            self._captured = output

    @contextlib.contextmanager
    def capturing(self):
        """Keep the module's output of every forward in this context."""
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self._captured = None
            self.teacher = None

    def outputs(self) -> Sequence[torch.Tensor]:
        """The kept outputs of the last forward, as the loss reads them."""
        output = self._captured
        if output is None:
            raise RuntimeError(f'head_distill: {type(self.module).__name__}'
                               ' did not run in the forward')
        if self.kind == 'det':  # cls_scores (then bbox_preds) per level
            scores = list(output[0])
            return scores + list(output[1]) if self.box_weight else scores
        if self.kind in ('seg', 'cls'):
            return [output]
        return list(output)

    def keep_teacher(self):
        """After the highest bit's forward: its outputs are the targets."""
        self.teacher = [t.detach() for t in self.outputs()]

    def loss(self) -> torch.Tensor:
        """The weighted loss of the last forward's outputs."""
        return self.weight * self.loss_of(self.outputs(), self.teacher)

    def loss_of(self, student: Sequence[torch.Tensor],
                teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unweighted loss of ``student`` against ``teacher`` tensors."""
        T = self.temperature
        if self.kind == 'features':
            return sum(F.mse_loss(s, t) for s, t in zip(student, teacher)) \
                / len(student)
        if self.kind in ('seg', 'cls'):  # mean over pixels / images
            s, t = student[0], teacher[0]
            return T * T * softmax_kl(s, t, T) / (s.numel() / s.shape[1])
        # the teacher's soft count of positives: most predictions are
        # background, so a mean over them would leave this loss far below
        # the focal loss, which is normalised by the positive anchors
        levels = len(student) // 2 if self.box_weight else len(student)
        scores = teacher[:levels]
        count = max(1.0, float(sum(t.sigmoid().sum() for t in scores)))
        loss = T * T * sum(sigmoid_kl(s, t, T)
                           for s, t in zip(student, scores))
        if self.box_weight:
            loss = loss + self.box_weight * sum(
                box_error(s, t, c) for s, t, c in
                zip(student[levels:], teacher[levels:], scores))
        return loss / count


def build_head_distill(architecture: nn.Module,
                       cfg: Optional[dict]) -> Optional[HeadDistill]:
    """``HeadDistill`` from the ``head_distill`` config (None: off); an
    unknown key is an error naming it."""
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ValueError(f'head_distill must be a dict such as '
                         f"dict(target='logits'), got {cfg!r}")
    check_keys('head_distill', cfg, KEYS)
    return HeadDistill(architecture, **cfg)
