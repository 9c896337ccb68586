"""Per-FPN-level norms and activation scales in shared detection heads
(docs/lowbit.md, Multi-level norms and activation scales).

A dense head (RetinaNet, FCOS, ATSS, ...) runs the same convs over every
FPN level, so one BN mixes the statistics of all levels, one set of affine
parameters serves them all, and one activation scale per bit quantizes
inputs whose ranges differ between levels by up to twice (FCOS-R18 here).
AQD (Chen et al., "AQD: Towards Accurate Quantized Object Detection", CVPR
2021) gives each level its own BN in the shared head; ``to_level_norms``
does that for every norm of the head (switchable per bit, or plain), and
``to_level_act_scales`` does the same for the input quantizers of the
head's quantized layers, while the convs and their weights stay shared.
"""
from torch import nn

from mmdrq.quantization import quantized_layers
from mmdrq.quantization.per_level import PerLevel, restart_levels_each_forward
from mmdrq.quantization.report import ConversionRow
from mmdrq.quantization.switchable_bn import SwitchableBatchNorm
from .tasks import dense_head

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
              SwitchableBatchNorm)


def _shared_head(architecture: nn.Module, option: str):
    """The single-stage detector's ``bbox_head`` and its FPN level count."""
    name = type(architecture).__name__
    head = dense_head(architecture)
    levels = getattr(getattr(head, 'prior_generator', None), 'num_levels',
                     None)
    if head is None or levels is None:
        raise ValueError(f'{option}=True needs a single-stage mmdet '
                         f'detector whose bbox_head runs over FPN levels '
                         f'(prior_generator); {name} has none')
    return head, levels


def _split(head: nn.Module, names: list, levels: int, what: str) -> list:
    """Replace each named module of ``head`` by a ``PerLevel`` of it;
    returns conversion-table rows."""
    rows, split = [], []
    for child in names:
        parent_name, _, attr = child.rpartition('.')
        parent = head.get_submodule(parent_name)
        module = getattr(parent, attr)
        per_level = PerLevel(module, levels)
        setattr(parent, attr, per_level)
        split.append(per_level)
        rows.append(ConversionRow(f'bbox_head.{child}', type(module).__name__,
                                  'per FPN level',
                                  f'{what} per FPN level ({levels})'))
    restart_levels_each_forward(head, split)
    return rows


def to_level_norms(architecture: nn.Module) -> list:
    """Give every norm of the detector's shared dense head one copy per FPN
    level, in place; returns conversion-table rows."""
    head, levels = _shared_head(architecture, 'multi_level_norm')
    names, inner = [], ()
    for child, module in head.named_modules():
        # per-bit copies of a switchable norm go with it
        if child.startswith(inner) or not isinstance(module, NORM_TYPES):
            continue
        inner = (child + '.', )
        names.append(child)
    if not names:
        raise ValueError(
            f'multi_level_norm=True: {type(head).__name__} of '
            f'{type(architecture).__name__} has no norm layers; give it one, '
            f"e.g. bbox_head.norm_cfg=dict(type='GN', num_groups=32, "
            f'requires_grad=True) or BN')
    return _split(head, names, levels, 'norm')


def to_level_act_scales(architecture: nn.Module) -> list:
    """Give the input quantizer of every quantized layer of the detector's
    shared dense head one copy per FPN level (each bit's scale initialised
    from, and learned on, its own level), in place; returns rows."""
    head, levels = _shared_head(architecture, 'multi_level_act_scales')
    names = [f'{name}.act_quantizer'
             for name, layer in quantized_layers(head).items()
             if layer.act_quantizer is not None]
    if not names:
        raise ValueError(
            f'multi_level_act_scales=True: {type(head).__name__} of '
            f'{type(architecture).__name__} has no quantized layer with an '
            'input quantizer (all skipped, or act_quantizer=None)')
    return _split(head, names, levels, 'activation scales')
