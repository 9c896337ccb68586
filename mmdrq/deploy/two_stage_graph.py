"""A two-stage detector (mmdet's ``StandardRoIHead``: Faster R-CNN, Mask
R-CNN) in the exported graph, as mmdet's ``TwoStageDetector.predict``:

- the RPN: per level the ``nms_pre`` best anchors, decoded, clipped,
  NMS within each level, then ``rpn.max_per_img`` proposals per image,
  ranked by their logits (the sigmoid's order). mmdet keeps however many
  survive; the graph keeps that fixed number, and drops the detections of
  the missing ones;
- each proposal pooled by torchvision's ``roi_align`` (ONNX ``RoiAlign``)
  on the level mmdet's ``SingleRoIExtractor`` maps it to;
- the box head: a box per class decoded from its proposal, clipped,
  softmax scores above ``score_thr``, class-aware NMS, ``max_per_img``
  (``detection_graph.best_detections``);
- Mask R-CNN: the mask head on those boxes (in the resized image, as mmdet
  runs it), output ``masks`` (B, K, M, M): each detection's mask of its
  own class after the sigmoid; pasting into the original image is the
  runtime's (``mmdrq_runtime.masks``), as in mmdet's ``FCNMaskHead``.
"""
from typing import Optional

import torch
from torch import nn

from .detection_graph import (as_output, best_detections, clip_to_image,
                              drop_small, dropped, nms_refusal)


def two_stage_refusal(model) -> Optional[str]:
    """Why a detector with a ``roi_head`` has no graph form (None: it
    has): found from its parts, before any export work."""
    from mmdet.models.dense_heads import RPNHead
    from mmdet.models.roi_heads import SingleRoIExtractor, StandardRoIHead
    from mmdet.models.roi_heads.bbox_heads import BBoxHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    roi_head, rpn_head = model.roi_head, getattr(model, 'rpn_head', None)
    if type(roi_head) is not StandardRoIHead:
        return (f'its roi_head {type(roi_head).__name__} is not mmdet\'s '
                'StandardRoIHead (Faster / Mask R-CNN): its stages have '
                'no graph form')
    if rpn_head is None or type(rpn_head)._predict_by_feat_single is not \
            RPNHead._predict_by_feat_single:
        return 'its proposals do not come from an mmdet RPNHead'
    heads = [('bbox', roi_head.bbox_head, BBoxHead)]
    if roi_head.with_mask:
        heads.append(('mask', roi_head.mask_head, FCNMaskHead))
    for kind, head, base in heads:
        extractor = getattr(roi_head, f'{kind}_roi_extractor')
        if not isinstance(head, base) or \
                getattr(head, 'custom_cls_channels', False):
            return (f'its {kind}_head {type(head).__name__} has no graph '
                    f'form (mmdet\'s {base.__name__} has)')
        if type(extractor) is not SingleRoIExtractor or any(
                type(layer).__name__ != 'RoIAlign' or
                layer.pool_mode != 'avg' for layer in extractor.roi_layers):
            return (f'its {kind}_roi_extractor is not a SingleRoIExtractor '
                    'of average RoIAlign layers')
        if kind == 'bbox' and head.bbox_coder.encode_size != 4:
            return f'its bbox_head coder {type(head.bbox_coder).__name__}'
    return nms_refusal('test_cfg.rpn.nms', rpn_head.test_cfg.nms) or \
        nms_refusal('test_cfg.rcnn.nms', roi_head.test_cfg.nms)


def pooled_features(extractor, feats, rois):
    """``SingleRoIExtractor``'s output without its data-dependent indexing:
    every level pools every RoI, each RoI keeps its own level's."""
    feats = feats[:extractor.num_inputs]
    levels = extractor.map_roi_levels(rois, len(feats))
    from torchvision.ops import roi_align
    pooled = None
    for level, (feat, layer) in enumerate(zip(feats, extractor.roi_layers)):
        out = roi_align(feat, rois, layer.output_size, layer.spatial_scale,
                        layer.sampling_ratio, layer.aligned)
        pooled = out if pooled is None else torch.where(
            (levels == level).view(-1, 1, 1, 1), out, pooled)
    return pooled


def to_rois(boxes):
    """(B, K, 4) boxes as mmdet's (B * K, 5) RoIs: image index first."""
    batch, count = boxes.shape[:2]
    index = torch.arange(batch, dtype=boxes.dtype, device=boxes.device)
    index = index.view(-1, 1, 1).expand(batch, count, 1)
    return torch.cat([index, boxes], dim=2).reshape(-1, 5)


class TwoStageDetections(nn.Module):
    """What the exporter traces for a two-stage detector:
    ``forward(inputs, image_size, inverse_scale)`` as
    ``detection_graph``'s, plus ``masks`` for Mask R-CNN."""

    def __init__(self, model: nn.Module, forward=None):
        super().__init__()
        self.model = model

    def forward(self, inputs, image_size, inverse_scale):
        model = self.model
        feats = model.extract_feat(inputs)
        proposals, valid = self.proposals(feats, image_size)
        roi_head = model.roi_head
        boxes, scores, labels = self.detections(feats, proposals, valid,
                                                image_size, inverse_scale)
        scores = as_output(scores)
        if not roi_head.with_mask:
            return boxes, scores, labels
        masks = roi_head.mask_head(pooled_features(
            roi_head.mask_roi_extractor, feats, to_rois(boxes)))
        batch, count = boxes.shape[:2]
        if not roi_head.mask_head.class_agnostic:
            masks = torch.gather(masks, 1, labels.reshape(-1, 1, 1, 1).expand(
                -1, 1, *masks.shape[2:]))
        masks = masks.sigmoid().reshape(batch, count, *masks.shape[2:])
        return boxes * inverse_scale.repeat(2), scores, labels, masks

    def proposals(self, feats, image_size):
        """RPNHead's ``predict``: (B, rpn.max_per_img, 4) proposals and
        whether each is one. Candidates rank by their logits: the order of
        mmdet's sigmoid scores, without ONNX Runtime's approximate
        Sigmoid."""
        head = self.model.rpn_head
        cfg = head.test_cfg
        cls_scores, bbox_preds = head(feats)
        priors = head.prior_generator.grid_priors(
            [c.shape[-2:] for c in cls_scores], dtype=cls_scores[0].dtype,
            device=cls_scores[0].device)
        boxes, scores, levels = [], [], []
        for level, (cls, pred, prior) in enumerate(
                zip(cls_scores, bbox_preds, priors)):
            batch = cls.shape[0]
            cls = cls.permute(0, 2, 3, 1)
            if head.use_sigmoid_cls:  # ranks as sigmoid(logit)
                score = cls.reshape(batch, -1)
            else:  # softmax(x)[0] = sigmoid(x[0] - x[1])
                pair = cls.reshape(batch, -1, 2)
                score = pair[..., 0] - pair[..., 1]
            count = score.shape[1]
            keep = min(cfg.nms_pre, count) if cfg.nms_pre > 0 else count
            score, index = score.topk(keep, dim=1)
            pred = pred.permute(0, 2, 3, 1).reshape(batch, -1, 4)
            pred = torch.gather(pred, 1, index[..., None].expand(-1, -1, 4))
            decoded = head.bbox_coder.decode(prior[index.reshape(-1)],
                                             pred.reshape(-1, 4))
            boxes.append(decoded.reshape(batch, keep, 4))
            scores.append(score)
            levels.append(torch.full_like(index, level))
        boxes = clip_to_image(torch.cat(boxes, dim=1), image_size)
        scores = drop_small(boxes, torch.cat(scores, dim=1),
                            cfg.get('min_bbox_size', -1))
        boxes, scores, _ = best_detections(
            boxes, scores, torch.cat(levels, dim=1), cfg.nms, len(levels),
            cfg.max_per_img)
        return boxes, torch.isfinite(scores)

    def detections(self, feats, proposals, valid, image_size, inverse_scale):
        """StandardRoIHead's ``predict_bbox``; boxes in the original image
        (in the resized one for a mask head, which rescales after)."""
        roi_head = self.model.roi_head
        head, cfg = roi_head.bbox_head, roi_head.test_cfg
        rois = to_rois(proposals)
        pooled = pooled_features(roi_head.bbox_roi_extractor, feats, rois)
        if roi_head.with_shared_head:
            pooled = roi_head.shared_head(pooled)
        cls_score, bbox_pred = head(pooled)
        batch, count, classes = *proposals.shape[:2], head.num_classes
        per_roi = 1 if head.reg_class_agnostic else classes
        boxes = head.bbox_coder.decode(
            rois[:, None, 1:].expand(-1, per_roi, 4).reshape(-1, 4),
            bbox_pred.reshape(-1, 4))
        boxes = boxes.reshape(batch, count, per_roi, 4).expand(
            -1, -1, classes, -1)
        if head.bbox_coder.clip_border:
            boxes = clip_to_image(boxes, image_size)
        if not roi_head.with_mask:
            boxes = boxes * inverse_scale.repeat(2)
        scores = cls_score.softmax(-1)[:, :classes].reshape(batch, count,
                                                            classes)
        scores = dropped(scores, (scores > cfg.score_thr) & valid[..., None])
        labels = torch.arange(classes, device=scores.device).expand(
            batch, count, classes)
        return best_detections(
            boxes.reshape(batch, -1, 4), scores.reshape(batch, -1),
            labels.reshape(batch, -1), cfg.nms, classes, cfg.max_per_img)
