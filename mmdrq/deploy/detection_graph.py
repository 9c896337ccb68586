"""A detector's post-processing in the exported graph: boxes, scores and
labels in the original image's coordinates.

The exporter traces a module whose forward runs from the image tensor to
the final detections: ``SingleStageDetections`` here (RetinaNet, FCOS,
ATSS, GFL: mmdet's ``BaseDenseHead`` post-processing) and
``two_stage_graph.TwoStageDetections`` (Faster / Mask R-CNN). Where mmdet's
code keeps a data-dependent number of boxes, the traced code keeps a fixed
number and scores the ones mmdet drops -inf (``dropped``):

- per level the ``nms_pre`` best (anchor, class) pairs, dropped below
  ``score_thr``;
- ``nms_keep`` (an operator of its own, ONNX ``NonMaxSuppression`` in the
  graph) drops what mmdet's class-aware ``batched_nms`` suppresses;
- ``best_detections`` keeps each image's ``max_per_img`` best, padded with
  dropped ones where fewer survive.

Scores only rank until the outputs (an RPN ranks by its logits: ONNX
Runtime's Sigmoid is an approximation, 0 below -18, which reorders
low-scoring anchors); the outputs score dropped ones -1.

Outputs ``boxes`` (B, K, 4), ``scores`` (B, K; -1 pads) and ``labels``
(B, K); inputs besides the image tensor ``image_size`` (height, width of
the resized image before padding) and ``inverse_scale`` (1 / w scale,
1 / h scale of the test pipeline's resize), float32, shared by the batch.
"""
from typing import Optional

import numpy as np
import torch
from onnx import numpy_helper
from torch import nn

from mmdrq.models.tasks import two_stage

# the graph's inputs besides the image tensor, and its outputs
EXTRA_INPUTS = ('image_size', 'inverse_scale')
OUTPUTS = ('boxes', 'scores', 'labels')
# the score of a dropped candidate; NMS takes every score above _VALID
DROPPED = float('-inf')
_VALID = float(np.finfo(np.float32).min)


@torch.library.custom_op('mmdrq::nms_keep', mutates_args=())
def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
             iou: float, num_groups: int) -> torch.Tensor:
    """``scores`` (B, N) dropped where NMS within each of ``num_groups``
    groups (B, N; a class, an RPN level) suppresses the box (B, N, 4), as
    mmdet's ``batched_nms``; dropped scores take no part."""
    from torchvision.ops import batched_nms
    kept = torch.full_like(scores, DROPPED)
    for image in range(len(scores)):
        valid = (scores[image] > _VALID).nonzero().squeeze(1)
        keep = valid[batched_nms(boxes[image, valid], scores[image, valid],
                                 groups[image, valid], iou)]
        kept[image, keep] = scores[image, keep]
    return kept


@nms_keep.register_fake
def _nms_keep_shape(boxes, scores, groups, iou, num_groups):
    return torch.empty_like(scores)


def nms_keep_onnx(boxes, scores, groups, iou: float, num_groups: int):
    """``nms_keep`` in ONNX: NonMaxSuppression with one score row per
    group (dropped outside it), survivors' scores scattered into dropped
    ones."""
    from onnxscript import opset20 as op
    rows = op.Constant(value=numpy_helper.from_array(
        np.arange(num_groups, dtype=np.int64).reshape(1, -1, 1)))
    axis1 = op.Constant(value_ints=[1])
    none = op.Constant(value_float=DROPPED)
    group_scores = op.Where(op.Equal(op.Unsqueeze(groups, axis1), rows),
                            op.Unsqueeze(scores, axis1), none)
    selected = op.NonMaxSuppression(
        boxes, group_scores, op.Shape(boxes, start=1, end=2),
        op.Constant(value_floats=[iou]), op.Constant(value_floats=[_VALID]))
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    return op.ScatterND(op.Expand(none, op.Shape(scores)), index,
                        op.GatherND(scores, index))


# what the exporter writes for the operators of this module
ONNX_FORMS = {torch.ops.mmdrq.nms_keep.default: nms_keep_onnx}


def best_detections(boxes, scores, labels, nms_cfg, num_groups: int,
                    count: int):
    """Class-aware NMS (``labels`` the groups), then each image's ``count``
    best boxes, scores and labels, padded with dropped ones."""
    scores = nms_keep(boxes, scores, labels, float(nms_cfg['iou_threshold']),
                      num_groups)
    batch = scores.shape[0]
    padded = torch.cat([scores, scores.new_full((batch, count), DROPPED)],
                       1)
    scores, index = padded.topk(count, dim=1)
    index = index.clamp(max=boxes.shape[1] - 1)  # pads: any box
    boxes = torch.gather(boxes, 1, index[..., None].expand(-1, -1, 4))
    return boxes, scores, torch.gather(labels, 1, index)


def clip_to_image(boxes, image_size):
    """Boxes (..., 4) clipped to (height, width), as mmdet's coders clip."""
    x = boxes[..., 0::2].clamp(min=0).minimum(image_size[1])
    y = boxes[..., 1::2].clamp(min=0).minimum(image_size[0])
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def dropped(scores, keep):
    """``scores`` where ``keep``, else dropped."""
    return torch.where(keep, scores, torch.full_like(scores, DROPPED))


def as_output(scores):
    """Scores as the graph outputs them: dropped ones -1."""
    return torch.where(torch.isfinite(scores), scores,
                       torch.full_like(scores, -1.0))


def drop_small(boxes, scores, smallest: float):
    """Drop boxes not wider and higher than ``smallest`` (mmdet's
    ``min_bbox_size``; a negative size drops none)."""
    if smallest < 0:
        return scores
    return dropped(scores, (boxes[..., 2] - boxes[..., 0] > smallest) &
                   (boxes[..., 3] - boxes[..., 1] > smallest))


def example_inputs(shape):
    """An image batch of ``shape`` and the extra inputs for it."""
    return (torch.zeros(shape),
            torch.tensor(shape[2:], dtype=torch.float32), torch.ones(2))


def detection_refusal(model) -> Optional[str]:
    """Why ``model``'s post-processing has no graph form (None: it has)."""
    if two_stage(model):
        from .two_stage_graph import two_stage_refusal
        return two_stage_refusal(model)
    from mmdet.models.dense_heads import GFLHead
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    head = model.bbox_head
    own = type(head)._predict_by_feat_single
    if own is not BaseDenseHead._predict_by_feat_single and \
            own is not GFLHead._predict_by_feat_single:
        return (f'{type(head).__name__} post-processes in its own way '
                '(RetinaNet, FCOS, ATSS, GFL and heads that keep mmdet\'s '
                'BaseDenseHead post-processing have a graph form)')
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        return 'a custom classification activation: no graph form'
    return nms_refusal('test_cfg.nms', head.test_cfg.get('nms', {}))


def nms_refusal(key: str, nms: dict) -> Optional[str]:
    if nms.get('type', 'nms') != 'nms' or nms.get('class_agnostic', False):
        return f'{key}={dict(nms)}: only class-aware nms has a form'
    return None


class SingleStageDetections(nn.Module):
    """What the exporter traces for a single-stage detector: its tensor
    forward, then mmdet's ``BaseDenseHead._predict_by_feat_single`` (and
    GFL's) for a batch of images that share one size: per level the
    ``nms_pre`` best pairs, their boxes decoded by the head's own coder,
    clipped and rescaled to the original image, scores times the score
    factors (FCOS, ATSS centerness), boxes not larger than
    ``min_bbox_size`` dropped; then NMS and ``max_per_img``."""

    def __init__(self, model: nn.Module, forward=None):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, inputs, image_size, inverse_scale):
        head = self.model.bbox_head
        outs = self._forward(self.model, inputs) if self._forward else \
            self.model(inputs, mode='tensor')
        cls_scores, bbox_preds = outs[0], outs[1]
        factors = outs[2] if len(outs) > 2 else [None] * len(cls_scores)
        cfg = head.test_cfg
        nms_pre, score_thr = cfg.get('nms_pre', -1), cfg.get('score_thr', 0)
        sizes = [c.shape[-2:] for c in cls_scores]
        priors = head.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        classes = head.cls_out_channels
        # GFL regresses a distribution per side: its integral times the
        # level's stride, from the anchor's center (GFLHead's own code)
        gfl = hasattr(head, 'integral')
        boxes, scores, labels = [], [], []
        for cls, pred, factor, prior, stride in zip(
                cls_scores, bbox_preds, factors, priors,
                head.prior_generator.strides):
            batch = cls.shape[0]
            cls = cls.permute(0, 2, 3, 1).reshape(batch, -1, classes)
            score = cls.sigmoid() if head.use_sigmoid_cls else \
                cls.softmax(-1)[..., :-1]
            pairs = score.reshape(batch, -1)
            pairs = dropped(pairs, pairs > score_thr)
            count = pairs.shape[1]
            keep = min(nms_pre, count) if nms_pre > 0 else count
            value, index = pairs.topk(keep, dim=1)
            box = torch.div(index, score.shape[-1], rounding_mode='floor')
            label = index % score.shape[-1]
            dim = head.bbox_coder.encode_size * (head.reg_max + 1 if gfl
                                                 else 1)
            pred = pred.permute(0, 2, 3, 1).reshape(batch, -1, dim)
            pred = torch.gather(pred, 1, box[..., None].expand(-1, -1, dim))
            pred, prior = pred.reshape(-1, dim), prior[box.reshape(-1)]
            if gfl:
                pred = head.integral(pred) * stride[0]
                prior = head.anchor_center(prior)
            decoded = head.bbox_coder.decode(prior, pred)
            boxes.append(decoded.reshape(batch, keep, 4))
            if factor is not None:
                factor = factor.permute(0, 2, 3, 1).reshape(batch, -1)
                factor = torch.gather(factor.sigmoid(), 1, box)
                # a dropped score stays dropped (-inf * 0 would be NaN)
                value = torch.where(torch.isfinite(value), value * factor,
                                    value)
            scores.append(value)
            labels.append(label)
        boxes = torch.cat(boxes, dim=1)
        if head.bbox_coder.clip_border:
            boxes = clip_to_image(boxes, image_size)
        boxes = boxes * inverse_scale.repeat(2)
        scores = drop_small(boxes, torch.cat(scores, dim=1),
                            cfg.get('min_bbox_size', -1))
        boxes, scores, labels = best_detections(
            boxes, scores, torch.cat(labels, dim=1), cfg.nms,
            head.cls_out_channels, cfg.max_per_img)
        return boxes, as_output(scores), labels
