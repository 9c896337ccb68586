"""Which OpenMMLab task a model is, told from its parts: the one place that
knows mmpretrain's ``head``, mmdet's ``bbox_head`` / ``roi_head`` and
mmseg's ``decode_head``."""
import sys
from typing import Optional

from torch import nn

TASKS = ('classification', 'detection', 'segmentation')


def task_of(model: nn.Module) -> Optional[str]:
    """``classification`` (an mmpretrain classifier's softmax head),
    ``detection`` (an mmdet detector with a dense or an RoI head),
    ``segmentation`` (an
    mmseg segmentor with a per-pixel decode head), or None."""
    if unsupported_reason(model) is not None:
        return None
    if decode_head(model) is not None:
        return 'segmentation'
    if dense_head(model) is not None or two_stage(model):
        return 'detection'
    head = getattr(model, 'head', None)
    if head is not None and hasattr(head, '_get_predictions'):
        return 'classification'
    return None


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why a detector or segmentor has no exported form (None: it has):
    found from its parts, before any export work."""
    detectors = sys.modules.get('mmdet.models.detectors')  # loaded with one
    if detectors is not None and isinstance(
            model, detectors.DetectionTransformer):
        return ('a DETR-style detector: its decoder runs queries '
                'chosen at run time')
    head = decode_head(model)
    if head is not None and not hasattr(head, 'conv_seg'):
        return (f'its decode head {type(head).__name__} predicts masks per '
                'query (MaskFormer-style), not logits per pixel')
    return None


def two_stage(model: nn.Module) -> bool:
    """An mmdet detector whose RoI head runs on its RPN's proposals."""
    return getattr(model, 'roi_head', None) is not None


def dense_head(model: nn.Module) -> Optional[nn.Module]:
    """The ``bbox_head`` of a single-stage mmdet detector (None for any
    other model): the head whose outputs are the predictions."""
    head = getattr(model, 'bbox_head', None)
    return None if head is None or two_stage(model) else head


def decode_head(model: nn.Module) -> Optional[nn.Module]:
    """The ``decode_head`` of an mmseg segmentor (None for any other
    model)."""
    return getattr(model, 'decode_head', None)
