"""Quantized forms of layers other than exact Conv2d/Linear: any module whose
forward reads its weight, plus the ones that transform it first (which
float types take which form: forms.py; attention's form: attention.py).

A module is converted in place: its class becomes a generated subclass of
its own (``QConvTranspose2d(SwappedWeightLayer, nn.ConvTranspose2d)``), so
every reference to it (shared heads) is converted at once, its state-dict
keys stay, and ``isinstance`` checks in the owner's code still hold.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantLayer


class SwappedWeightLayer(QuantLayer):
    """A module whose own forward reads its weight: during that forward the
    weight parameter is replaced by its fake-quantized tensor (what
    ``torch.func.functional_call`` does), and the first input (each tensor
    of a list: TridentConv) is fake-quantized.

    The FP parameter stays registered under its name, so checkpoints,
    optimizers and init code (``nn.init.*_(module.weight)`` after the
    conversion, as MMEngine's runner calls ``init_weights``) see it as
    before; only the layer's own forward sees the quantized weight.
    """

    @classmethod
    def from_float(cls, module: nn.Module, bits, weight_quantizer: dict,
                   act_quantizer: Optional[dict]):
        """Convert ``module`` in place (no copy) and return it; if the
        quantizers cannot be built, ``module`` keeps its float class."""
        float_type, attributes = type(module), set(vars(module))
        children = dict(module._modules)
        module.__class__ = quantized_class(cls, float_type)
        try:
            with torch.device(module._parameters[cls.weight_name].device):
                module._setup(bits, weight_quantizer, act_quantizer)
        except BaseException:
            module.__class__ = float_type
            for name in set(vars(module)) - attributes:
                delattr(module, name)
            module._modules.clear()
            module._modules.update(children)
            raise
        return module

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        """Why ``module`` cannot take this form (None: it can)."""
        return None

    def forward(self, x, *args, **kwargs):
        x = self.quantize_input(x)
        with self.quantized_parameter():
            return super().forward(x, *args, **kwargs)


class TransposedConvLayer(SwappedWeightLayer):
    """ConvTranspose1d/2d/3d: the weight is ``(in, out / groups, *k)``;
    per-output-channel scales need output channels first, per group."""
    macs_per_input = True

    def to_channel_major(self, weight):
        return _swap_group_axes(weight, self.groups)

    def from_channel_major(self, weight):
        return _swap_group_axes(weight, self.groups)


def _swap_group_axes(weight, groups):
    """``(a, b, *k)`` -> ``(groups * b, a / groups, *k)``: dims 0 and 1
    swapped within each group; its own inverse between the two layouts."""
    (rows, cols), kernel = weight.shape[:2], weight.shape[2:]
    return weight.reshape(groups, rows // groups, cols, *kernel) \
        .transpose(1, 2).reshape(groups * cols, rows // groups, *kernel)


class EmbeddingLayer(SwappedWeightLayer):
    """nn.Embedding (``QuantizeConfig.embeddings``): each row of the table
    (a token's vector) gets its own scale, the way the weight of a Linear
    gets one per output channel; the input is token ids, never quantized,
    and a lookup counts no MACs."""

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> Optional[str]:
        if module.max_norm is not None:
            return 'max_norm renormalizes the table in place at each lookup'
        if module.sparse:
            return 'sparse gradients (sparse=True)'
        return None

    def _setup(self, bits, weight_quantizer: dict,
               act_quantizer: Optional[dict]):
        super()._setup(bits, weight_quantizer, None)

    def macs(self, args: tuple, kwargs: dict, out) -> int:
        return 0


class DeformConvPackLayer(SwappedWeightLayer):
    """mmcv DeformConv2dPack: the offsets come from ``conv_offset`` (a plain
    conv, quantized as any other, reading the FP input with its own
    scale); the deformable conv reads the quantized input and weight.
    ``input_layers``: children that feed the layer, not what follows it
    (a BN after the layer follows the layer, not ``conv_offset``)."""
    input_layers = ('conv_offset', )

    def forward(self, x):
        from mmcv.ops import DeformConv2d
        offset = self.conv_offset(x)
        x_q = self.quantize_input(x)
        with self.quantized_parameter():
            return DeformConv2d.forward(self, x_q, offset)


class ModulatedDeformConvPackLayer(DeformConvPackLayer):
    """mmcv ModulatedDeformConv2dPack (DCNv2): as ``DeformConvPackLayer``,
    with the mask from the same offset conv."""

    def forward(self, x):
        from mmcv.ops import ModulatedDeformConv2d
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
        x_q = self.quantize_input(x)
        with self.quantized_parameter():
            return ModulatedDeformConv2d.forward(self, x_q, offset, mask)


class TransformedWeightLayer(SwappedWeightLayer):
    """A layer whose forward computes the weight it uses from the parameter
    (standardization, normalization): the quantizer sees that computed
    weight, the one the conv or matmul uses. Its integers do not give the
    parameter back, so an integer checkpoint keeps the FP parameter."""
    integer_weight = False

    def weight_to_quantize(self):
        return self.used_weight(self.float_weight)

    def used_weight(self, weight):
        """The weight the float layer's op uses, from the parameter."""
        raise NotImplementedError


class ConvWSLayer(TransformedWeightLayer):
    """mmcv ConvWS2d: the standardized weight (``conv_ws_2d``'s)."""

    def used_weight(self, weight):
        flat = weight.view(weight.size(0), -1)
        view = (-1, ) + (1, ) * (weight.dim() - 1)
        mean = flat.mean(dim=1, keepdim=True).view(view)
        std = flat.std(dim=1, keepdim=True).view(view)
        return (weight - mean) / (std + self.eps)

    def forward(self, x):
        return F.conv2d(self.quantize_input(x), self.quantized_weight(),
                        self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ConvAWSLayer(ConvWSLayer):
    """mmcv ConvAWS2d: the standardized weight after its affine buffers."""

    def used_weight(self, weight):
        return self._get_weight(weight)


class NormedLayer(TransformedWeightLayer):
    """mmdet NormedLinear / NormedConv2d (cosine classifiers): the
    normalized weight, and the normalized, temperature-scaled input."""

    def used_weight(self, weight):
        if getattr(self, 'norm_over_kernel', False):
            norm = weight.view(weight.size(0), -1).norm(dim=1, keepdim=True)
            norm = norm.view(-1, *([1] * (weight.dim() - 1)))
        else:
            norm = weight.norm(dim=1, keepdim=True)
        return weight / (norm.pow(self.power) + self.eps)

    def forward(self, x):
        x = x / (x.norm(dim=1, keepdim=True).pow(self.power) + self.eps)
        x = self.quantize_input(x * self.tempearture)
        weight = self.quantized_weight()
        if isinstance(self, nn.Linear):
            return F.linear(x, weight, self.bias)
        return self._conv_forward(x, weight, self.bias)


_CLASSES: Dict[tuple, type] = {}


def quantized_class(form: type, float_type: type) -> type:
    """``Q<float_type>``: ``form``'s behaviour on ``float_type``, made once
    and kept as a module attribute that pickle finds by its qualified name.
    That name spells out the form and the float type's module, so types of
    the same name (torch's and mmcv's ConvTranspose2d) never depend on
    which was converted first; tables and errors show ``Q<name>``."""
    key = (form, float_type)
    if key not in _CLASSES:
        name = 'Q' + float_type.__name__
        qualname = '__'.join((form.__name__, float_type.__module__.replace(
            '.', '_'), float_type.__name__))
        cls = type(name, (form, float_type), dict(
            __module__=__name__, __qualname__=qualname, mmdrq_form=form))
        _CLASSES[key] = globals()[qualname] = cls
    return _CLASSES[key]
