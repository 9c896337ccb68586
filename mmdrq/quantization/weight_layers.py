"""Quantized forms of layers other than exact Conv2d/Linear: any module whose
forward reads its weight, plus the ones that transform it first (the table
and the design: docs/method.md, Which layers are quantized).

A module is converted in place: its class becomes a generated subclass of
its own (``QConvTranspose2d(SwappedWeightLayer, nn.ConvTranspose2d)``), so
every reference to it (shared heads) is converted at once, its state-dict
keys stay, and ``isinstance`` checks in the owner's code still hold.
"""
import contextlib
import functools
import inspect
import math
import re
import sys
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantLayer, build_in_scope


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


class MultiheadAttentionLayer(SwappedWeightLayer):
    """nn.MultiheadAttention with a packed ``in_proj_weight`` (what mmcv,
    mmdet, mmseg and mmpretrain build): the q, k and v projections share the
    weight quantizer (one scale per row, so per projection and output
    channel) and each reads its input through its own act quantizer, as
    three Linear layers would; ``out_proj`` is a QLinear of its own, called
    here on the attention output (``F.multi_head_attention_forward`` reads
    ``out_proj.weight`` and would skip its input quantizer).

    The attention products (q k^T, softmax v) stay FP unless
    ``quantize_matmuls`` (``attention_matmuls=True`` in the config) gives
    their inputs act quantizers: the paper quantizes conv and linear layers.
    """
    weight_name = 'in_proj_weight'
    MATMUL_QUANTIZERS = ('q_matmul_quantizer', 'k_matmul_quantizer',
                         'softmax_quantizer', 'v_matmul_quantizer')

    @classmethod
    def unsupported_reason(cls, module):
        if not module._qkv_same_embed_dim:
            return ('separate q/k/v projection weights (kdim/vdim != '
                    'embed_dim) are not supported')
        return None

    def _setup(self, bits, weight_quantizer, act_quantizer):
        super()._setup(bits, weight_quantizer, act_quantizer)
        for name in ('key_act_quantizer', 'value_act_quantizer'):
            setattr(self, name, None if act_quantizer is None else
                    build_in_scope(dict(act_quantizer, bits=self.bits)))

    def quantize_matmuls(self, act_quantizer: Optional[dict]):
        """Quantize the inputs of q k^T and softmax(.) v at the layer's bit
        too, each with its own per-bit scale (no-op without act
        quantizers)."""
        with torch.device(self.float_weight.device):
            for name in self.MATMUL_QUANTIZERS:
                setattr(self, name, None if act_quantizer is None else
                        build_in_scope(dict(act_quantizer, bits=self.bits)))

    def _matmul_quantizer(self, name):
        return getattr(self, name, None)

    def _quantize(self, quantizer, x):
        return x if quantizer is None else quantizer(x, self.bit)

    def forward(self, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True,
                is_causal=False):
        if is_causal and attn_mask is None:
            raise RuntimeError('Need attn_mask if specifying the is_causal '
                               'hint (as nn.MultiheadAttention)')
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1)
                                 for t in (query, key, value))
        out, weights = self._attention(
            self._quantize(self.act_quantizer, query),
            self._quantize(self.key_act_quantizer, key),
            self._quantize(self.value_act_quantizer, value),
            _additive_mask(key_padding_mask, query.dtype),
            _additive_mask(attn_mask, query.dtype), need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), \
                None if weights is None else weights.squeeze(0)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projection(self, query, key, value):
        """q, k, v: the quantized packed weight's three row blocks (the
        ONNX export's stand-in runs them as three named linears)."""
        biases = (None, ) * 3 if self.in_proj_bias is None else \
            self.in_proj_bias.chunk(3)
        return (F.linear(x, w, b) for x, w, b in zip(
            (query, key, value), self.quantized_weight().chunk(3), biases))

    def _attention(self, query, key, value, key_padding_mask, attn_mask,
                   need_weights):
        """``F.multi_head_attention_forward``'s math on (L, N, E) inputs
        with additive masks; weights per head (N, H, L, S) or None."""
        length, batch, embed = query.shape
        heads = self.num_heads
        head_dim = embed // heads
        q, k, v = self._in_projection(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            attn_mask, key_padding_mask = (
                None if m is None else F.pad(m, (0, 1))
                for m in (attn_mask, key_padding_mask))
        q, k, v = (t.reshape(t.shape[0], batch * heads, head_dim)
                   .transpose(0, 1) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch * heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = (
                None if m is None else F.pad(m, (0, 1))
                for m in (attn_mask, key_padding_mask))
        source = k.shape[1]
        mask = None if attn_mask is None else \
            attn_mask.reshape(-1, length, source)
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(batch, 1, 1, source).expand(
                -1, heads, -1, -1).reshape(batch * heads, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        quantize = [self._matmul_quantizer(n) for n in self.MATMUL_QUANTIZERS]
        if need_weights or any(quantize):
            q_quantizer, k_quantizer, softmax_quantizer, v_quantizer = quantize
            q = self._quantize(q_quantizer, q * math.sqrt(1.0 / head_dim))
            k = self._quantize(k_quantizer, k)
            scores = torch.bmm(q, k.transpose(1, 2)) if mask is None else \
                torch.baddbmm(mask, q, k.transpose(1, 2))
            weights = F.softmax(scores, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)
            out = torch.bmm(self._quantize(softmax_quantizer, weights),
                            self._quantize(v_quantizer, v))
            weights = weights.view(batch, heads, length, source)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout)
            weights = None
        # (N, L, E) into out_proj: its MACs count per image (dim 0)
        out = out.view(batch, heads, length, head_dim).permute(0, 2, 1, 3) \
            .reshape(batch, length, embed)
        return self.out_proj(out).transpose(0, 1), weights


class WeightReadingOwner:
    """An owner whose code reads quantized children's weights directly
    (BEiT's ``F.linear(x, self.qkv.weight)``): during its forward those
    weights are their fake-quantized tensors. What it feeds them is not
    known here, so their inputs stay FP. ``mmdrq_weight_reads`` names the
    submodules (dotted below children: TOOD's
    ``self.reduction_conv.conv.weight``)."""
    mmdrq_weight_reads: tuple = ()

    @classmethod
    def from_owner(cls, owner: nn.Module, children) -> nn.Module:
        owner.__class__ = quantized_class(cls, type(owner))
        owner.mmdrq_weight_reads = tuple(children)
        return owner

    def forward(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for child in self.mmdrq_weight_reads:
                stack.enter_context(
                    self.get_submodule(child).quantized_parameter())
            return super().forward(*args, **kwargs)


_WEIGHT_READ = re.compile(r'self\.(\w+(?:\.\w+)*)\.weight\b')


def weight_reads(owner: nn.Module) -> list:
    """Submodules of ``owner`` that its class's methods (or a base's, short
    of torch's, MMEngine's and mmdrq's) read as ``self.<child>.weight`` or
    ``self.<child>.<grandchild>.weight``; ``init*`` methods are left out
    (they run outside a forward)."""
    found = []
    for cls in type(owner).__mro__:
        for name in _class_weight_reads(cls):
            if name not in found and _submodule(owner, name) is not None:
                found.append(name)
    return found


def _submodule(owner: nn.Module, path: str) -> Optional[nn.Module]:
    """``owner``'s submodule at the dotted ``path`` (None if absent)."""
    module = owner
    for part in path.split('.'):
        module = module._modules.get(part)
        if module is None:
            return None
    return module


@functools.lru_cache(maxsize=None)
def _class_weight_reads(cls: type) -> tuple:
    if cls.__module__.split('.')[0] in ('torch', 'mmengine', 'mmdrq',
                                        'builtins'):
        return ()
    names = []
    for attr, function in vars(cls).items():
        if 'init' in attr or not inspect.isfunction(function):
            continue
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):  # no source to read
            continue
        names += _WEIGHT_READ.findall(source)
    return tuple(dict.fromkeys(names))


def _additive_mask(mask, dtype):
    """A boolean mask (True: not attended) as 0 / -inf; a float one as is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype,
                       device=mask.device).masked_fill_(mask, float('-inf'))


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
        cls = type(name, (form, float_type), dict(__module__=__name__,
                                                  __qualname__=qualname))
        _CLASSES[key] = globals()[qualname] = cls
    return _CLASSES[key]


def weight_layer_forms() -> Dict[type, type]:
    """Float layer type -> the form that quantizes it in place, for the
    types whose forward is known: torch's, mmcv's, and mmcv's ops and
    mmdet's layers once imported (a model holding them has imported them;
    importing them here would cost every other model seconds). Exact types
    only: a subclass may use its weight otherwise."""
    swapped = (nn.Conv1d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    forms = {t: SwappedWeightLayer for t in swapped}
    forms.update({t: TransposedConvLayer for t in transposed})
    forms[nn.MultiheadAttention] = MultiheadAttentionLayer
    try:
        from mmcv.cnn.bricks import ConvAWS2d, ConvWS2d, wrappers
        from mmcv.cnn.bricks.conv2d_adaptive_padding import \
            Conv2dAdaptivePadding
    except ImportError:  # mmcv is optional for plain torch models
        return forms
    forms.update({
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
    return forms
