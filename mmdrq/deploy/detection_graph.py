"""A single-stage detector's post-processing in the exported graph: boxes,
scores and labels in the original image's coordinates.

``DetectionCandidates`` is what the exporter traces: the detector's tensor
forward, then mmdet's ``BaseDenseHead._predict_by_feat_single`` (and GFL's) for a batch
of images that share one size: per level the ``nms_pre`` best (anchor,
class) pairs above ``score_thr``, their boxes decoded by the head's own
coder and clipped to the image, rescaled to the original image, scores
times the score factors (FCOS, ATSS centerness), boxes not larger than
``min_bbox_size`` dropped. A fixed number of
candidates per level keeps the graph static; a pair below ``score_thr``
gets the score -1. ``append_nms`` then adds ONNX ``NonMaxSuppression`` per
class (mmdet's class-aware ``batched_nms``) and keeps each image's
``max_per_img`` best: outputs ``boxes`` (B, K, 4), ``scores`` (B, K; -1
pads) and ``labels`` (B, K).
"""
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

# the graph's inputs besides the image tensor
EXTRA_INPUTS = ('image_size', 'inverse_scale')


def detection_refusal(model) -> Optional[str]:
    """Why ``model``'s post-processing has no graph form (None: it has)."""
    from mmdet.models.dense_heads import GFLHead
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    head = model.bbox_head
    own = type(head)._predict_by_feat_single
    if own is not BaseDenseHead._predict_by_feat_single and \
            own is not GFLHead._predict_by_feat_single:
        return (f'{type(head).__name__} post-processes in its own way '
                '(RetinaNet, FCOS, ATSS, GFL and heads that keep mmdet\'s '
                'BaseDenseHead post-processing have a graph form)')
    cfg = head.test_cfg
    nms = cfg.get('nms', {})
    if nms.get('type', 'nms') != 'nms' or nms.get('class_agnostic', False):
        return f'test_cfg.nms={dict(nms)}: only class-aware nms has a form'
    if getattr(head.loss_cls, 'custom_cls_channels', False):
        return 'a custom classification activation: no graph form'
    return None


class DetectionCandidates(nn.Module):
    """The traced part: ``forward(inputs, image_size, inverse_scale)`` with
    ``image_size`` (height, width) of the resized image before padding and
    ``inverse_scale`` (1 / w scale, 1 / h scale) of the test pipeline's
    resize, both float32, shared by the batch."""

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
            pairs = torch.where(pairs > score_thr, pairs,
                                torch.full_like(pairs, -1.0))
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
                value = torch.where(value > -1, value * torch.gather(
                    factor.sigmoid(), 1, box), value)
            scores.append(value)
            labels.append(label)
        boxes = torch.cat(boxes, dim=1)
        if head.bbox_coder.clip_border:
            x = boxes[..., 0::2].clamp(min=0).minimum(image_size[1])
            y = boxes[..., 1::2].clamp(min=0).minimum(image_size[0])
            boxes = torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]],
                                dim=-1)
        boxes = boxes * inverse_scale.repeat(2)
        scores = torch.cat(scores, dim=1)
        smallest = cfg.get('min_bbox_size', -1)
        if smallest >= 0:  # mmdet drops boxes not wider and higher
            wide = (boxes[..., 2] - boxes[..., 0] > smallest) & \
                (boxes[..., 3] - boxes[..., 1] > smallest)
            scores = torch.where(wide, scores, torch.full_like(scores, -1.0))
        return boxes, scores, torch.cat(labels, dim=1)

    @staticmethod
    def example_inputs(shape):
        return (torch.zeros(shape),
                torch.tensor(shape[2:], dtype=torch.float32),
                torch.ones(2))


def append_nms(proto: onnx.ModelProto, model) -> dict:
    """Append class-aware NonMaxSuppression and the per-image
    ``max_per_img`` best to the candidates' graph (in place)."""
    head = model.bbox_head
    cfg = head.test_cfg
    graph = proto.graph
    boxes, scores, labels = (o.name for o in graph.output)
    del graph.output[:]

    def const(name, value, dtype):
        graph.initializer.append(numpy_helper.from_array(
            np.array(value, dtype), f'nms.{name}'))
        return f'nms.{name}'

    def node(op, inputs, output, **attrs):
        graph.node.append(helper.make_node(op, inputs, [f'nms.{output}'],
                                           name=f'nms.{output}', **attrs))
        return f'nms.{output}'

    classes = const('classes', np.arange(head.cls_out_channels)
                    .reshape(1, -1, 1), np.int64)
    class_scores = node('Where', [
        node('Equal', [node('Unsqueeze', [labels, const('axis1', [1],
                                                        np.int64)],
                            'labels_1'), classes], 'is_class'),
        node('Unsqueeze', [scores, 'nms.axis1'], 'scores_1'),
        const('none', -1.0, np.float32)], 'class_scores')
    count = node('Slice', [node('Shape', [boxes], 'box_shape'),
                           const('one', [1], np.int64),
                           const('two', [2], np.int64)], 'count')
    selected = node('NonMaxSuppression', [
        boxes, class_scores, count,
        const('iou', [cfg.nms.iou_threshold], np.float32),
        const('score', [0.0], np.float32)], 'selected')
    image = node('Gather', [selected, const('col0', 0, np.int64)],
                 'image', axis=1)
    label = node('Gather', [selected, 'nms.one'], 'label', axis=1)
    label = node('Squeeze', [label, 'nms.axis1'], 'label_flat')
    box_index = node('Gather', [selected, const('cols02', [0, 2], np.int64)],
                     'box_index', axis=1)
    kept_scores = node('GatherND', [class_scores, selected], 'kept_scores')
    kept_boxes = node('GatherND', [boxes, box_index], 'kept_boxes')
    batch = node('Slice', [node('Shape', [boxes], 'shape'),
                           const('zero', [0], np.int64), 'nms.one'],
                 'batch')
    images = node('Range', [const('start', 0, np.int64),
                            node('Squeeze', [batch], 'batch_size'),
                            const('step', 1, np.int64)], 'images')
    per_image = node('Where', [
        node('Equal', [node('Unsqueeze', [images, 'nms.axis1'], 'images_1'),
                       node('Unsqueeze', [image, const('axis0', [0],
                                                       np.int64)],
                            'image_0')], 'of_image'),
        node('Unsqueeze', [kept_scores, 'nms.axis0'], 'kept_scores_0'),
        'nms.none'], 'per_image')
    kept = node('Slice', [node('Shape', [kept_scores], 'kept_shape'),
                          'nms.zero', 'nms.one'], 'kept')
    top = node('Min', [kept, const('max_per_img', [cfg.max_per_img],
                                   np.int64)], 'top')
    graph.node.append(helper.make_node(
        'TopK', [per_image, top], ['scores', 'nms.best'], axis=1,
        name='nms.topk'))
    graph.node.extend([
        helper.make_node('Gather', [kept_boxes, 'nms.best'], ['boxes'],
                         axis=0, name='nms.boxes'),
        helper.make_node('Gather', [label, 'nms.best'], ['labels'], axis=0,
                         name='nms.labels')])
    graph.output.extend([
        helper.make_tensor_value_info('boxes', TensorProto.FLOAT,
                                      ['batch', 'detections', 4]),
        helper.make_tensor_value_info('scores', TensorProto.FLOAT,
                                      ['batch', 'detections']),
        helper.make_tensor_value_info('labels', TensorProto.INT64,
                                      ['batch', 'detections'])])
    return dict(task='detection', extra_inputs=list(EXTRA_INPUTS),
                outputs=['boxes', 'scores', 'labels'])
