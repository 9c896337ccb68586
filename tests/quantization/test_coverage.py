"""The forward-traced weight coverage: each weight's use (quantized, FP,
mixed, unused) follows what reached the arithmetic, whatever the module
types and however the weight was read."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mmdrq import (DoubleRoundingQuantizer, QConv2d, QLinear,
                   quantize_model)
from mmdrq.quantization.coverage import tracing_weight_uses

BITS = (8, 4)


def _uses(model, *inputs):
    with torch.no_grad(), tracing_weight_uses(model) as uses:
        model(*inputs)
    return uses


def _by_use(uses):
    return {name: weight.use for name, weight in uses.weights.items()}


def test_converted_cnn_first_last_named_apart(make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=BITS).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)  # fills the eval caches of the quantized weights
    uses = _uses(model, x)
    assert _by_use(uses) == {
        'stem.weight': 'fp', 'conv1.weight': 'quantized',
        'conv2.weight': 'quantized', 'conv3.weight': 'quantized',
        'fc1.weight': 'quantized', 'fc2.weight': 'fp'}
    sizes = {n: w.numel for n, w in uses.weights.items()}
    total = sum(sizes.values())
    kept = sizes['stem.weight'] + sizes['fc2.weight']
    assert uses.share(('quantized', )) == pytest.approx(1 - kept / total)
    assert uses.share(('fp', ), kept=True) == pytest.approx(kept / total)
    assert uses.fp_layers() == {}
    assert set(uses.fp_layers(kept=True)) == {'stem.weight', 'fc2.weight'}
    assert uses.summary().endswith('0.0% other FP')


class _Attention(nn.Module):
    """A stem, a packed-projection MultiheadAttention, a linear whose
    weight the owner reads directly (BEiT's qkv), a head."""

    def __init__(self, dim=8):
        super().__init__()
        self.stem = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, 2)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        x = self.attn(x, x, x)[0]
        q = F.linear(x, self.qkv.weight)[..., :x.shape[-1]]
        return self.head(x + q)


def test_packed_attention_and_direct_reads():
    x = torch.randn(5, 2, 4)
    model = _Attention()
    uses = _uses(model, x)
    assert set(_by_use(uses).values()) == {'fp'}
    assert uses.fp_layers()['attn.in_proj_weight'] == \
        'not converted (MultiheadAttention)'

    # a quantized layer whose owner reads its FP weight directly
    model.qkv = QLinear.from_float(model.qkv, BITS)
    assert _uses(model, x).fp_layers()['qkv.weight'] == \
        'converted, but the forward reads the weight directly'

    # quantize_model: the packed projections and the direct read quantized
    uses = _uses(quantize_model(_Attention(), bits=BITS), x)
    assert _by_use(uses) == {
        'stem.weight': 'fp', 'attn.in_proj_weight': 'quantized',
        'attn.out_proj.weight': 'quantized', 'qkv.weight': 'quantized',
        'head.weight': 'fp'}
    assert uses.fp_layers() == {}
    assert set(uses.fp_layers(kept=True)) == {'stem.weight', 'head.weight'}


class _QuantizedAttention(nn.Module):
    """MultiheadAttention whose packed and output projections are read
    through Double Rounding quantizers (what a quantized form must do)."""

    def __init__(self, dim=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2)
        self.in_quantizer = DoubleRoundingQuantizer(BITS, 3 * dim)
        self.out_quantizer = DoubleRoundingQuantizer(BITS, dim)

    def forward(self, x):
        attn = self.attn
        return F.multi_head_attention_forward(
            x, x, x, attn.embed_dim, attn.num_heads,
            self.in_quantizer(attn.in_proj_weight, 4), attn.in_proj_bias,
            None, None, False, 0.0,
            self.out_quantizer(attn.out_proj.weight, 4), attn.out_proj.bias,
            training=False, need_weights=False)[0]


def test_quantizer_outputs_are_quantized_uses():
    uses = _uses(_QuantizedAttention(), torch.randn(5, 2, 8))
    assert _by_use(uses) == {'attn.in_proj_weight': 'quantized',
                             'attn.out_proj.weight': 'quantized'}
    # no conversion table: nothing is kept FP on purpose
    assert uses.share(('quantized', )) == 1.0


class _Shared(nn.Module):
    """One conv object used at two places (RTMDet's ``share_conv``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        conv = nn.Conv2d(4, 4, 3, padding=1)
        self.first = nn.ModuleList([conv])
        self.second = nn.ModuleList([conv])
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.second[0](self.first[0](x)))


def test_shared_module_converted_once_is_mixed():
    model = _Shared()
    x = torch.randn(1, 3, 6, 6)
    # one reference replaced by a quantized layer, the other left FP
    model.first[0] = QConv2d.from_float(model.first[0], BITS)
    uses = _uses(model, x)
    assert uses.weights['first.0.weight'].use == 'mixed'
    assert 'shared' in uses.fp_layers()['first.0.weight']
    # quantize_model converts a shared module at every reference
    uses = _uses(quantize_model(_Shared(), bits=BITS), x)
    assert uses.weights['first.0.weight'].use == 'quantized'


class _Standardized(nn.Module):
    """mmcv's ConvWS2d (weight standardized in its forward), FP and with
    the standardized weight quantized."""

    def __init__(self, quantize):
        super().__init__()
        from mmcv.cnn.bricks import ConvWS2d
        self.conv = ConvWS2d(3, 4, 3)
        self.quantizer = DoubleRoundingQuantizer(BITS, 4) if quantize \
            else None

    def forward(self, x):
        weight = self.conv.weight
        flat = weight.reshape(weight.shape[0], -1)
        weight = (weight - flat.mean(1).view(-1, 1, 1, 1)) / (
            flat.std(1).view(-1, 1, 1, 1) + 1e-5)
        if self.quantizer is not None:
            weight = self.quantizer(weight, 4)
        return F.conv2d(x, weight)


@pytest.mark.parametrize('quantize', [False, True])
def test_derived_weight_keeps_its_kind(quantize):
    from mmcv.cnn.bricks import ConvWS2d
    x = torch.randn(1, 3, 6, 6)
    expected = 'quantized' if quantize else 'fp'
    assert _by_use(_uses(_Standardized(quantize), x)) == {
        'conv.weight': expected}
    assert _by_use(_uses(ConvWS2d(3, 4, 3), x)) == {'weight': 'fp'}


class _Deformable(nn.Module):
    """mmcv's modulated deformable conv (a C++ extension op on the CPU),
    its weight read FP or through a quantizer."""

    def __init__(self, quantize):
        super().__init__()
        from mmcv.ops import ModulatedDeformConv2dPack
        self.dcn = ModulatedDeformConv2dPack(3, 4, 3, padding=1)
        self.quantizer = DoubleRoundingQuantizer(BITS, 4) if quantize \
            else None

    def forward(self, x):
        from mmcv.ops import modulated_deform_conv2d
        dcn = self.dcn
        offset_x, offset_y, mask = dcn.conv_offset(x).chunk(3, dim=1)
        weight = dcn.weight
        if self.quantizer is not None:
            weight = self.quantizer(weight, 4)
        return modulated_deform_conv2d(
            x, torch.cat((offset_x, offset_y), 1), mask.sigmoid(), weight,
            dcn.bias, 1, 1, 1, 1, 1)


@pytest.mark.parametrize('quantize', [False, True])
def test_deformable_conv_extension_op(quantize):
    uses = _uses(_Deformable(quantize), torch.randn(1, 3, 5, 5))
    assert _by_use(uses) == {
        'dcn.weight': 'quantized' if quantize else 'fp',
        'dcn.conv_offset.weight': 'fp'}


class _Quantized(nn.Module):
    """A parametrization reading the weight through a quantizer."""

    def __init__(self, channels):
        super().__init__()
        self.quantizer = DoubleRoundingQuantizer(BITS, channels)

    def forward(self, weight):
        return self.quantizer(weight, 4)


def test_parametrized_weight_and_unused_branch():
    model = nn.ModuleDict(dict(conv=nn.Conv2d(3, 4, 3),
                               unused=nn.Linear(4, 4)))
    parametrize.register_parametrization(model.conv, 'weight', _Quantized(4))
    with torch.no_grad(), tracing_weight_uses(model) as uses:
        model.conv(torch.randn(1, 3, 5, 5))
    assert _by_use(uses) == {'conv.weight': 'quantized',
                             'unused.weight': 'unused'}
    assert uses.unused() == ['unused.weight']
    assert uses.share(('quantized', )) == 1.0


def test_inputs_made_inside_the_block_are_data():
    """Random and shape-made tensors are data: a weight meeting them is
    used (mmcv's deformable conv fills such buffers outside the
    dispatcher)."""
    linear = nn.Linear(4, 3)
    with torch.no_grad(), tracing_weight_uses(linear) as uses:
        linear(torch.randn(2, 4))
        linear(torch.zeros(2, 4))
    assert uses.weights['weight'].use == 'fp'
