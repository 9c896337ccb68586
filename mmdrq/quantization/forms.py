"""The one table of the layer types mmdrq quantizes.

Each float layer type maps to its *form*: the quantized class whose
``from_float`` converts a layer of that type (QConv2d and QLinear wrap exact
Conv2d / Linear; the forms of weight_layers.py and attention.py quantize the
others in place). Everything else asks the form, not the type: conversion
(``from_float``, ``unsupported_reason``, ``input_layers``), counting
(``macs``), deploy numerics (``sums_integers``), the BN fold of export and
deploy numerics (``folds_bn``); the export keeps one
stand-in per form (``mmdrq.deploy.layer_forms.STAND_INS``). A new layer type
is one ``register_form`` call here and, to export, one stand-in there.

Exact types only: a subclass may use its weight otherwise, so it stays FP
and the conversion table says so.
"""
import sys
from typing import Dict

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .attention import MultiheadAttentionLayer
from .layers import QConv2d, QLinear, QuantLayer
from .weight_layers import (ConvAWSLayer, ConvWSLayer, DeformConvPackLayer,
                            EmbeddingLayer, ModulatedDeformConvPackLayer,
                            NormedLayer, SwappedWeightLayer,
                            TransposedConvLayer)

_REGISTERED: Dict[type, type] = {}


def register_form(float_type: type, form: type):
    """Quantize layers of exactly ``float_type`` with ``form`` (a QuantLayer
    subclass with ``from_float``; SwappedWeightLayer suits any layer whose
    forward reads ``self.weight``)."""
    if not (isinstance(form, type) and issubclass(form, QuantLayer)):
        raise TypeError(f'register_form: form must be a QuantLayer subclass '
                        f'(SwappedWeightLayer for a layer whose forward reads '
                        f'self.weight), got {form!r}')
    if not (isinstance(float_type, type) and
            issubclass(float_type, nn.Module)):
        raise TypeError(f'register_form: float_type must be an nn.Module '
                        f'subclass, got {float_type!r}')
    _REGISTERED[float_type] = form


def layer_forms() -> Dict[type, type]:
    """Float layer type -> its form: torch's, mmcv's, and mmcv's ops and
    mmdet's layers once imported (a model holding them has imported them;
    importing them here would cost every other model seconds), then the
    registered ones."""
    forms = {nn.Conv2d: QConv2d, nn.Linear: QLinear,
             NonDynamicallyQuantizableLinear: QLinear,
             nn.Conv1d: SwappedWeightLayer, nn.Conv3d: SwappedWeightLayer,
             nn.MultiheadAttention: MultiheadAttentionLayer,
             nn.Embedding: EmbeddingLayer}  # only with embeddings=True
    forms.update({t: TransposedConvLayer for t in (
        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)})
    try:
        from mmcv.cnn.bricks import ConvAWS2d, ConvWS2d, wrappers
        from mmcv.cnn.bricks.conv2d_adaptive_padding import \
            Conv2dAdaptivePadding
    except ImportError:  # mmcv is optional for plain torch models
        return {**forms, **_REGISTERED}
    forms.update({
        # mmcv's wrappers only add empty-input handling
        wrappers.Conv2d: QConv2d, wrappers.Linear: QLinear,
        wrappers.Conv3d: SwappedWeightLayer,
        wrappers.ConvTranspose2d: TransposedConvLayer,
        wrappers.ConvTranspose3d: TransposedConvLayer,
        Conv2dAdaptivePadding: SwappedWeightLayer,
        ConvWS2d: ConvWSLayer, ConvAWS2d: ConvAWSLayer})
    if 'mmcv.ops' in sys.modules:
        from mmcv.ops import (DeformConv2d, DeformConv2dPack,
                              ModulatedDeformConv2d,
                              ModulatedDeformConv2dPack)
        forms.update({
            DeformConv2d: SwappedWeightLayer,
            ModulatedDeformConv2d: SwappedWeightLayer,
            DeformConv2dPack: DeformConvPackLayer,
            ModulatedDeformConv2dPack: ModulatedDeformConvPackLayer})
    if 'mmdet.models' in sys.modules:
        from mmdet.models.backbones.trident_resnet import TridentConv
        from mmdet.models.layers import NormedConv2d, NormedLinear
        forms.update({TridentConv: SwappedWeightLayer,
                      NormedLinear: NormedLayer, NormedConv2d: NormedLayer})
    return {**forms, **_REGISTERED}


def form_of(layer: QuantLayer) -> type:
    """The form a quantized layer took (QConv2d, or the in-place form of a
    generated ``Q<float type>`` class)."""
    return getattr(type(layer), 'mmdrq_form', type(layer))


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d)


def folds_bn(module: nn.Module) -> bool:
    """Whether a BN that is the only consumer of this layer's output is
    folded into it, by the ONNX export and deploy numerics alike: every
    convolution, FP or quantized, and a quantized transposed one (the
    export rewrites its weight per channel anyway)."""
    if isinstance(module, TRANSPOSED_CONVS):
        return isinstance(module, QuantLayer)
    return isinstance(module, CONVS)


def is_weight_layer(module: nn.Module) -> bool:
    """Conv- or linear-like layers, with a form or not: the ones a user
    expects to see in the conversion table."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear,
                           nn.MultiheadAttention, QuantLayer)):
        return True
    name = type(module).__name__
    return ('Conv' in name or 'Linear' in name) and isinstance(
        getattr(module, 'weight', None), nn.Parameter)
