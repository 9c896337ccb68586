"""The layers quantized in place (mmdrq/quantization/weight_layers.py): each
against the float op on Double Rounded (float64, numpy, written here)
weights and inputs at every bit, ties included; integer export -> reload
bit-exact; shared modules; unsupported types; bit switching."""
import copy
import pickle
import types
import zlib

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks import ConvAWS2d, ConvWS2d
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.ops import (DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d,
                      ModulatedDeformConv2dPack)
from mmdet.models.backbones.trident_resnet import TridentConv
from mmdet.models.layers import NormedConv2d, NormedLinear
from torch import nn
from torch.func import functional_call

from mmdrq import load_int, quantize_model, save_int
from mmdrq.quantization import (QConv2d, QLinear, QuantLayer,
                                quantized_layers, recording_calls, set_bits,
                                set_layer_bits)
from conftest import ref_act, ref_weight

F64 = torch.float64
BITS = (8, 6, 4, 2)


def make_gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def act_ref(x, quantizer, bit):
    """``ref_act`` for any act quantizer (attention has three inputs)."""
    return ref_act(x.detach(), types.SimpleNamespace(act_quantizer=quantizer),
                   bit)


def transpose_per_group(w, groups):
    """(in, out/g, *k) -> (out, in/g, *k) and back: dims 0 and 1 swapped
    group by group."""
    per_group = w.shape[0] // groups
    return torch.cat([w[g * per_group:(g + 1) * per_group].transpose(0, 1)
                      for g in range(groups)])


def standardized(w, eps):
    """mmcv's ``conv_ws_2d`` standardization."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1).view(-1, 1, 1, 1)
    return (w - mean) / (std + eps)


def normed(w, module):
    if getattr(module, 'norm_over_kernel', False):
        norm = w.reshape(w.shape[0], -1).norm(dim=1).view(-1, 1, 1, 1)
    else:
        norm = w.norm(dim=1, keepdim=True)
    return w / (norm.pow(module.power) + module.eps)


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


# name: (build float64 module, inputs(gen), channel-major of the weight and
# back, or None for the parameter's own layout)
IDENTITY = (lambda w, m: w, lambda w, m: w)
TRANSPOSED = (lambda w, m: transpose_per_group(w, m.groups), ) * 2
CASES = {
    'conv1d': (lambda: nn.Conv1d(4, 6, 3, padding=1, groups=2),
               lambda g: (rand(g, 2, 4, 7), )),
    'conv3d': (lambda: nn.Conv3d(2, 4, (3, 1, 3), padding=1, stride=2),
               lambda g: (rand(g, 1, 2, 4, 3, 5), )),
    'conv_transpose1d': (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2),
        lambda g: (rand(g, 2, 4, 5), ), TRANSPOSED),
    'conv_transpose2d': (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                   output_padding=1, groups=2),
        lambda g: (rand(g, 2, 4, 3, 4), ), TRANSPOSED),
    'conv_transpose3d': (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2),
                         lambda g: (rand(g, 1, 2, 2, 3, 2), ), TRANSPOSED),
    'adaptive_padding': (lambda: Conv2dAdaptivePadding(3, 4, 3, stride=2),
                         lambda g: (rand(g, 2, 3, 7, 6), )),
    'trident': (lambda: TridentConv(4, 6, 3, trident_dilations=(1, 2),
                                        test_branch_idx=-1),
                lambda g: ([rand(g, 1, 4, 6, 6), rand(g, 1, 4, 6, 6)], )),
    'deform': (lambda: DeformConv2d(4, 6, 3, padding=1),
               lambda g: (rand(g, 1, 4, 5, 5), rand(g, 1, 18, 5, 5))),
    'modulated_deform': (
        lambda: ModulatedDeformConv2d(4, 6, 3, padding=1, groups=2),
        lambda g: (rand(g, 1, 4, 5, 5), rand(g, 1, 18, 5, 5),
                   torch.rand(1, 9, 5, 5, generator=g, dtype=F64))),
    'deform_pack': (lambda: DeformConv2dPack(4, 6, 3, padding=1),
                    lambda g: (rand(g, 1, 4, 5, 5), )),
    'modulated_deform_pack': (
        lambda: ModulatedDeformConv2dPack(4, 6, 3, padding=1),
        lambda g: (rand(g, 1, 4, 5, 5), )),
    'conv_ws': (lambda: ConvWS2d(4, 6, 3, padding=1),
                lambda g: (rand(g, 2, 4, 5, 5), )),
    'conv_aws': (lambda: ConvAWS2d(4, 6, 3, padding=1),
                 lambda g: (rand(g, 2, 4, 5, 5), )),
    'normed_linear': (lambda: NormedLinear(8, 5, tempearture=3.0),
                      lambda g: (rand(g, 3, 8), )),
    'normed_conv2d': (lambda: NormedConv2d(4, 6, 3, norm_over_kernel=True),
                      lambda g: (rand(g, 2, 4, 5, 5), )),
}
# the weight the float op uses, from the parameter (transformed layers)
USED_WEIGHT = {
    'conv_ws': lambda w, m: standardized(w, m.eps),
    'conv_aws': lambda w, m: m._get_weight(w),
    'normed_linear': normed, 'normed_conv2d': normed,
}


def build(name, seed=0):
    torch.manual_seed(seed)
    module = CASES[name][0]().double()
    if name == 'trident':  # its weight is left uninitialised until init
        nn.init.normal_(module.weight, std=0.2)
    if name == 'conv_aws':  # affine buffers away from (1, 0)
        module.weight_gamma.uniform_(0.5, 1.5)
        module.weight_beta.uniform_(-0.1, 0.1)
    return module


def convert(module):
    wrapper = nn.Sequential(module)
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   switchable_bn=False, skip=[
                       '0.conv_offset'] if hasattr(module, 'conv_offset')
                   else [])
    return wrapper


def initialise(wrapper, inputs):
    for bit in BITS:
        set_bits(wrapper, bit)
        wrapper[0](*inputs)


def reference(name, float_module, layer, inputs, bit):
    """The float module's op on the Double Rounded weight and input."""
    to_cm, from_cm = CASES[name][2] if len(CASES[name]) > 2 else IDENTITY
    used = USED_WEIGHT.get(name, lambda w, m: w)
    weight = used(layer.float_weight.detach(), float_module)
    w_q, _ = ref_weight(to_cm(weight, float_module),
                        layer.weight_quantizer.scale[0], BITS[0], bit)
    w_q = from_cm(w_q, float_module)
    x, *rest = inputs
    if name.startswith('normed'):
        x = x / (x.norm(dim=1, keepdim=True).pow(float_module.power)
                 + float_module.eps) * float_module.tempearture
        x = act_ref(x, layer.act_quantizer, bit)
        return F.linear(x, w_q, float_module.bias) if name.endswith(
            'linear') else F.conv2d(x, w_q, float_module.bias)
    if name in ('conv_ws', 'conv_aws'):
        return F.conv2d(act_ref(x, layer.act_quantizer, bit), w_q,
                        float_module.bias, float_module.stride,
                        float_module.padding)
    x_q = [act_ref(t, layer.act_quantizer, bit) for t in x] \
        if isinstance(x, list) else act_ref(x, layer.act_quantizer, bit)
    if name.endswith('deform_pack'):  # offsets from the FP input, FP conv
        offset = float_module.conv_offset(x)
        if name.startswith('modulated'):
            o1, o2, mask = offset.chunk(3, dim=1)
            rest = [torch.cat((o1, o2), dim=1), mask.sigmoid()]
            return ModulatedDeformConv2d.forward(
                _with_weight(float_module, w_q), x_q, *rest)
        return DeformConv2d.forward(_with_weight(float_module, w_q), x_q,
                                    offset)
    return functional_call(float_module, {'weight': w_q}, (x_q, *rest))


def _with_weight(module, weight):
    copied = copy.deepcopy(module)
    del copied.weight
    copied.weight = weight
    return copied


def set_ties(layer, gen, name):
    """Power-of-two scales (per channel) and weights and inputs on the
    grids' half steps: first and second rounding ties, exactly."""
    wq = layer.weight_quantizer
    channels = wq.scale.shape[1]
    scale = 2.0**-(4 + torch.arange(channels) % 3).to(F64)
    with torch.no_grad():
        wq.scale.copy_(scale.view(1, -1))
        for quantizer in layer.quantizers()[1:]:
            quantizer.scale.fill_(2.0**-4)
        if layer.integer_weight:
            to_cm, from_cm = CASES[name][2] if len(CASES[name]) > 2 \
                else IDENTITY
            shape = to_cm(layer.float_weight, layer).shape
            halves = torch.randint(-2**BITS[0] - 6, 2**BITS[0] + 6, shape,
                                   generator=gen).to(F64) / 2
            cm = halves * scale.view(-1, *[1] * (len(shape) - 1))
            layer.float_weight.copy_(from_cm(cm, layer))


def tie_inputs(inputs, gen):
    def halves(t):
        return torch.randint(-40, 40, t.shape, generator=gen).to(F64) / 32
    x, *rest = inputs
    return ([halves(t) for t in x] if isinstance(x, list) else halves(x),
            *rest)


def check_outputs(name, float_module, wrapper, inputs):
    layer = wrapper[0]
    for bit in BITS:
        set_bits(wrapper, bit)  # bit control reaches the layer
        assert layer.bit == bit
        ref = reference(name, float_module, layer, inputs, bit)
        for mode in ('train', 'eval'):
            wrapper.train(mode == 'train')
            with torch.set_grad_enabled(mode == 'train'):
                out = layer(*inputs)
            for o, r in zip(out if isinstance(out, list) else [out],
                            ref if isinstance(ref, list) else [ref]):
                torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name', list(CASES))
def test_layer_matches_float64_reference(name):
    """Every bit, train and eval, on random data and then on ties; the
    backward reaches the weight, the scales and the input."""
    gen = make_gen(name)
    float_module = build(name)
    wrapper = convert(copy.deepcopy(float_module))
    layer = wrapper[0]
    assert isinstance(layer, QuantLayer) and isinstance(
        layer, type(float_module))
    inputs = CASES[name][1](gen)
    initialise(wrapper, inputs)
    check_outputs(name, float_module, wrapper, inputs)
    set_ties(layer, gen, name)
    inputs = tie_inputs(inputs, gen)
    check_outputs(name, float_module, wrapper, inputs)
    wrapper.train()
    set_bits(wrapper, BITS[0])
    x = inputs[0]
    for t in (x if isinstance(x, list) else [x]):
        t.requires_grad_(True)
    out = layer(*inputs)
    sum(o.square().sum() for o in (out if isinstance(out, list)
                                   else [out])).backward()
    assert layer.float_weight.grad.abs().sum() > 0
    assert layer.weight_quantizer.scale.grad is not None
    assert (x[0] if isinstance(x, list) else x).grad is not None


def test_used_weight_is_the_float_layers():
    """The weight the reference derives is the one the float layers use."""
    gen = make_gen('used')
    for name in USED_WEIGHT:
        module = build(name)
        x, = CASES[name][1](gen)
        weight = USED_WEIGHT[name](module.weight, module)
        if name.startswith('normed'):
            x_n = x / (x.norm(dim=1, keepdim=True).pow(module.power)
                       + module.eps) * module.tempearture
            ref = F.linear(x_n, weight, module.bias) if name.endswith(
                'linear') else F.conv2d(x_n, weight, module.bias)
        else:
            ref = F.conv2d(x, weight, module.bias, module.stride,
                           module.padding)
        torch.testing.assert_close(module(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', list(CASES))
def test_integer_export_reload_bit_exact(name, tmp_path):
    gen = make_gen('export', name)
    float_module = build(name)
    wrapper = convert(copy.deepcopy(float_module))
    twin = convert(copy.deepcopy(float_module))
    inputs = CASES[name][1](gen)
    initialise(wrapper, inputs)
    wrapper[0].float_weight.data.add_(0.01 * torch.randn(
        wrapper[0].float_weight.shape, generator=gen, dtype=F64))
    sizes = save_int(wrapper, str(tmp_path / 'int.pth'))
    assert (sizes['int_bytes'] > 0) == wrapper[0].integer_weight
    load_int(twin, str(tmp_path / 'int.pth'))
    wrapper.eval(), twin.eval()
    for bit in BITS:
        set_bits(wrapper, bit), set_bits(twin, bit)
        with torch.no_grad():
            a, b = wrapper[0](*inputs), twin[0](*inputs)
        for x, y in zip(a if isinstance(a, list) else [a],
                        b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


# --------------------------------------------------------- attention


def attention_ref(layer, bit, query, key, value):
    """Multi-head attention in float64, written out: Double Rounded q/k/v
    and out projection weights, each projection's input quantized."""
    length, batch, embed = query.shape
    heads = layer.num_heads
    dim = embed // heads
    w_in, _ = ref_weight(layer.in_proj_weight, layer.weight_quantizer.scale[0],
                         BITS[0], bit)
    out_proj = layer.out_proj
    w_out, _ = ref_weight(out_proj.weight, out_proj.weight_quantizer.scale[0],
                          BITS[0], bit)
    projected = []
    for i, (x, quantizer) in enumerate(zip(
            (query, key, value), (layer.act_quantizer,
                                  layer.key_act_quantizer,
                                  layer.value_act_quantizer))):
        rows = slice(i * embed, (i + 1) * embed)
        y = act_ref(x, quantizer, bit) @ w_in[rows].T + \
            layer.in_proj_bias[rows]
        # (L, N, E) -> (N, H, L, D)
        projected.append(y.reshape(y.shape[0], batch, heads, dim)
                         .permute(1, 2, 0, 3))
    q, k, v = projected
    q = q / dim**0.5
    matmul = getattr(layer, 'softmax_quantizer', None) is not None
    if matmul:  # each product's inputs quantized with their own scales
        q, k, v = (act_ref(t, getattr(layer, name), bit) for t, name in zip(
            (q, k, v), ('q_matmul_quantizer', 'k_matmul_quantizer',
                        'v_matmul_quantizer')))
    weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    probs = act_ref(weights, layer.softmax_quantizer, bit) if matmul \
        else weights
    out = (probs @ v).permute(2, 0, 1, 3).reshape(length, batch, embed)
    out = act_ref(out, out_proj.act_quantizer, bit) @ w_out.T + out_proj.bias
    return out, weights.mean(dim=1)


@pytest.mark.parametrize('matmuls', [False, True])
def test_attention_matches_float64_reference(matmuls):
    """Self- and cross-attention at every bit, ties included; the packed
    in_proj rows get their own scales, out_proj is a QLinear of its own;
    with ``attention_matmuls`` the products' inputs are quantized too."""
    gen = make_gen('attention', matmuls)
    torch.manual_seed(1)
    wrapper = nn.Sequential(nn.MultiheadAttention(8, 2).double())
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   attention_matmuls=matmuls)
    layer = wrapper[0]
    assert len(layer.quantizers()) == (8 if matmuls else 4)
    assert isinstance(layer, nn.MultiheadAttention)
    assert isinstance(layer.out_proj, QLinear)
    assert set(quantized_layers(wrapper)) == {'0', '0.out_proj'}
    assert layer.weight_quantizer.scale.shape == (1, 24)
    x, memory = rand(gen, 5, 2, 8), rand(gen, 6, 2, 8)
    calls = [(x, x, x), (x, memory + 1, memory)]
    for call in calls:
        initialise(wrapper, call)
    for tie in (False, True):
        if tie:
            with torch.no_grad():
                for quantizer in layer.quantizers() + \
                        layer.out_proj.quantizers():
                    quantizer.scale.fill_(2.0**-4)
                layer.weight_quantizer.scale.fill_(2.0**-6)
                layer.in_proj_weight.copy_(torch.randint(
                    -260, 260, (24, 8), generator=gen).to(F64) / 2**7)
            calls = [tuple(torch.randint(-40, 40, t.shape, generator=gen)
                           .to(F64) / 32 for t in call) for call in calls]
        for bit in BITS:
            set_bits(wrapper, bit)
            for call in calls:
                out, weights = layer(*call)
                ref_out, ref_weights = attention_ref(layer, bit, *call)
                torch.testing.assert_close(out, ref_out, rtol=1e-10,
                                           atol=1e-10)
                torch.testing.assert_close(weights, ref_weights, rtol=1e-10,
                                           atol=1e-10)


ATTENTION_OPTIONS = [
    dict(kwargs=dict(batch_first=True), call=dict()),
    dict(kwargs=dict(), call=dict(need_weights=False)),
    dict(kwargs=dict(bias=False, add_bias_kv=True, add_zero_attn=True),
         call=dict(average_attn_weights=False)),
    dict(kwargs=dict(), call=dict(key_padding_mask=True, attn_mask='float')),
    dict(kwargs=dict(), call=dict(attn_mask='bool', need_weights=False)),
    dict(kwargs=dict(), call=dict(unbatched=True)),
]


@pytest.mark.parametrize('case', range(len(ATTENTION_OPTIONS)))
def test_attention_weight_only_matches_torch(case):
    """Without input quantizers the layer is nn.MultiheadAttention on the
    Double Rounded weights: batch_first, masks, bias_kv, zero attention,
    unbatched inputs and per-head weights as torch computes them."""
    options = ATTENTION_OPTIONS[case]
    gen = make_gen('attention-options', case)
    torch.manual_seed(case)
    float_module = nn.MultiheadAttention(8, 2, **options['kwargs']).double()
    float_module.eval()
    wrapper = nn.Sequential(copy.deepcopy(float_module))
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   act_quantizer=None)
    layer = wrapper[0].eval()
    call = dict(options['call'])
    batch_shape = () if call.pop('unbatched', False) else (2, ) \
        if float_module.batch_first else None
    shape_q = (5, 8) if batch_shape == () else (2, 5, 8) \
        if batch_shape else (5, 2, 8)
    shape_k = (shape_q[:-2] + (6, 8)) if batch_shape is not None else (6, 2, 8)
    if batch_shape == ():
        shape_k = (6, 8)
    query, key = rand(gen, *shape_q), rand(gen, *shape_k)
    if call.get('key_padding_mask'):
        call['key_padding_mask'] = torch.rand(2, 6, generator=gen) < 0.3
    if call.get('attn_mask') == 'float':
        call['attn_mask'] = rand(gen, 4, 5, 6)
    elif call.get('attn_mask') == 'bool':
        call['attn_mask'] = torch.rand(5, 6, generator=gen) < 0.3
    for bit in BITS:
        set_bits(wrapper, bit)
        with torch.no_grad():
            out, weights = layer(query, key, key, **call)
            w_in, _ = ref_weight(layer.in_proj_weight,
                                 layer.weight_quantizer.scale[0], 8, bit)
            w_out, _ = ref_weight(
                layer.out_proj.weight,
                layer.out_proj.weight_quantizer.scale[0], 8, bit)
            ref_out, ref_weights = functional_call(
                float_module, {'in_proj_weight': w_in,
                               'out_proj.weight': w_out},
                (query, key, key), call)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        if ref_weights is None:
            assert weights is None
        else:
            torch.testing.assert_close(weights, ref_weights, rtol=1e-10,
                                       atol=1e-10)


def test_attention_integer_export_bit_exact(tmp_path):
    gen = make_gen('attention-export')
    float_module = nn.MultiheadAttention(8, 2).double()
    wrapper, twin = (convert(copy.deepcopy(float_module)) for _ in range(2))
    x = rand(gen, 5, 2, 8)
    initialise(wrapper, (x, x, x))
    save_int(wrapper, str(tmp_path / 'int.pth'))
    load_int(twin, str(tmp_path / 'int.pth'))
    wrapper.eval(), twin.eval()
    for bit in BITS:
        set_layer_bits(wrapper, {'0': bit, '0.out_proj': BITS[-1]})
        set_layer_bits(twin, {'0': bit, '0.out_proj': BITS[-1]})
        with torch.no_grad():
            assert torch.equal(wrapper[0](x, x, x)[0], twin[0](x, x, x)[0])


# ------------------------------------------ conversion: sharing, FP reasons


class SharedHeads(nn.Module):
    """RTMDet's ``share_conv``: one conv object in every level's head, and
    a shared transposed conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        shared = nn.Conv2d(4, 4, 3, padding=1)
        up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.levels = nn.ModuleList(
            nn.Sequential(shared, nn.BatchNorm2d(4), nn.ReLU(), up)
            for _ in range(3))
        self.cls = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return [self.cls(level(x)) for level in self.levels]


def test_shared_modules_quantized_at_every_reference():
    model = SharedHeads()
    quantize_model(model)
    shared = [level[0] for level in model.levels]
    ups = [level[3] for level in model.levels]
    assert all(isinstance(m, QConv2d) and m is shared[0] for m in shared)
    assert all(isinstance(m, QuantLayer) and m is ups[0] for m in ups)
    assert set(quantized_layers(model)) == {'levels.0.0', 'levels.0.3'}
    calls = {}
    for name, module in quantized_layers(model).items():
        module.register_forward_pre_hook(
            lambda *a, name=name: calls.__setitem__(
                name, calls.get(name, 0) + 1))
    with recording_calls(model) as called:
        model(torch.randn(1, 3, 4, 4))
    assert called == {'levels.0.0', 'levels.0.3'}
    assert calls == {'levels.0.0': 3, 'levels.0.3': 3}
    # each level's BN follows the shared conv
    rows = {r.layer: r.status for r in model.mmdrq_report}
    assert rows['levels.2.1'] == 'switchable BN (follows levels.0.0)'


class AfterTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=4)
        self.head = nn.Conv1d(6, 2, 1)


def test_fp_reasons_and_switchable_bn_source():
    model = AfterTransposed()
    quantize_model(model, skip_first_last=False)
    rows = {r.layer: r.status for r in model.mmdrq_report}
    assert rows['bn'] == 'switchable BN (follows up)'
    assert rows['attn'] == ('FP: separate q/k/v projection weights '
                            '(kdim/vdim != embed_dim) are not supported')
    assert rows['attn.out_proj'] == 'FP: out_proj of attn, which stays FP'
    assert type(model.attn) is nn.MultiheadAttention
    assert rows['head'] == 'quantized [8, 6, 4, 2]'
    assert set(quantized_layers(model)) == {'stem', 'up', 'head'}


@pytest.mark.parametrize('pack', [DeformConv2dPack,
                                  ModulatedDeformConv2dPack])
def test_bn_after_deformable_conv_follows_it(pack):
    """A DCN Pack's offset conv comes after it in module order but feeds
    it: the BN after the DCN follows the DCN's bit in a SubNet."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), pack(4, 6, 3, padding=1),
                          nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1))
    quantize_model(model, bits=BITS, skip_first_last=False)
    rows = {r.layer: r.status for r in model.mmdrq_report}
    assert rows['2'] == 'switchable BN (follows 1)'
    set_bits(model, 8)
    set_layer_bits(model, {'1': 2, '1.conv_offset': 6})
    assert model[2].bit == 2
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5))


def test_skip_pattern_keeps_new_layer_fp():
    model = AfterTransposed()
    quantize_model(model, skip=['up', 'attn'], skip_first_last=False)
    rows = {r.layer: r.status for r in model.mmdrq_report}
    assert rows['up'] == "FP: matches skip pattern 'up'"
    assert type(model.up) is nn.ConvTranspose2d
    assert rows['bn'] == 'switchable BN (follows global bit)'


def test_quantized_class_pickles_and_copies():
    model = AfterTransposed()
    quantize_model(model, skip_first_last=False)
    x = torch.randn(1, 3, 5, 5)
    out = model.up(model.stem(x))
    copied = copy.deepcopy(model)
    assert type(copied.up) is type(model.up)
    torch.testing.assert_close(copied.up(copied.stem(x)), out)
    assert pickle.loads(pickle.dumps(type(model.up))) is type(model.up)



class EveryForm(nn.Module):
    """A conv, BN, transposed conv, DCNv2 + BN, attention and an owner
    reading its child's weight: one of each thing a conversion adds."""

    def __init__(self):
        super().__init__()
        from mmpretrain.models.utils.attention import BEiTAttention
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.dcn = nn.Sequential(ModulatedDeformConv2dPack(4, 8, 3, padding=1),
                                 nn.BatchNorm2d(8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.beit = BEiTAttention(8, 2, window_size=None,
                                  use_rel_pos_bias=False, bias='qv_bias')

    def forward(self, x):
        tokens = self.dcn(self.up(self.stem(x))).flatten(2).transpose(1, 2)
        return self.beit(self.attn(tokens, tokens, tokens)[0])


def test_whole_converted_model_saves_and_loads(tmp_path):
    """``torch.save(model)`` pickles every module and hook (a lambda load
    hook of the quantizers made it fail); the loaded model computes the
    same at every bit and still reads checkpoints."""
    torch.manual_seed(6)
    model = EveryForm()
    quantize_model(model, bits=BITS, skip_first_last=False)
    x = torch.randn(2, 3, 3, 3)
    model(x)  # scales initialised
    model.eval()
    path = tmp_path / 'model.pth'
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert [type(m) for m in loaded.modules()] == \
        [type(m) for m in model.modules()]
    with torch.no_grad():
        for bit in BITS:
            set_bits(model, bit), set_bits(loaded, bit)
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    for module in loaded.modules():
        if hasattr(module, 'initialized'):
            module._ready = set()
    loaded.load_state_dict(model.state_dict())  # its load hooks run
    assert [m.ready for m in loaded.modules() if hasattr(m, 'initialized')] \
        == [m.ready for m in model.modules() if hasattr(m, 'initialized')]


def test_types_of_one_name_get_one_name_in_any_order():
    """torch's and mmcv's ConvTranspose2d are both ``QConvTranspose2d`` in
    tables and errors, whichever was converted first, and each pickles as
    its own class."""
    from mmcv.cnn.bricks import wrappers
    for first, second in ((wrappers.ConvTranspose2d, nn.ConvTranspose2d),
                          (nn.ConvTranspose2d, wrappers.ConvTranspose2d)):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), first(4, 4, 2),
                              second(4, 4, 2), nn.Conv2d(4, 2, 1))
        quantize_model(model, skip_first_last=False)
        assert type(model[1]).__name__ == type(model[2]).__name__ == \
            'QConvTranspose2d'
        assert type(model[1]) is not type(model[2])
        for layer in model[1:3]:
            assert pickle.loads(pickle.dumps(type(layer))) is type(layer)

def test_mmcv_multihead_attention_wrapper():
    """mmcv's MultiheadAttention (DETR-style heads) calls the converted
    nn.MultiheadAttention with keyword arguments, batch first, a padding
    mask and positions: its output is the float wrapper's on the Double
    Rounded weights (no input quantizers here)."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    gen = make_gen('mmcv-attention')
    torch.manual_seed(2)
    float_module = MultiheadAttention(8, 2, batch_first=True).double().eval()
    wrapper = nn.Sequential(copy.deepcopy(float_module))
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   act_quantizer=None)
    assert set(quantized_layers(wrapper)) == {'0.attn', '0.attn.out_proj'}
    attn = wrapper[0].attn
    query, key = rand(gen, 2, 5, 8), rand(gen, 2, 6, 8)
    call = dict(query=query, key=key, value=key, query_pos=rand(gen, 2, 5, 8),
                key_padding_mask=torch.rand(2, 6, generator=gen) < 0.3)
    wrapper.eval()
    for bit in (8, 2):
        set_bits(wrapper, bit)
        with recording_calls(wrapper) as called, torch.no_grad():
            out = wrapper[0](**call)
        assert called == {'0.attn', '0.attn.out_proj'}
        w_in, _ = ref_weight(attn.in_proj_weight,
                             attn.weight_quantizer.scale[0], 8, bit)
        w_out, _ = ref_weight(attn.out_proj.weight,
                              attn.out_proj.weight_quantizer.scale[0], 8, bit)
        with torch.no_grad():
            ref = functional_call(float_module, {
                'attn.in_proj_weight': w_in, 'attn.out_proj.weight': w_out},
                (), call)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_owner_reading_a_weight_gets_the_quantized_one():
    """BEiT's attention reads ``qkv.weight`` with F.linear: in its forward
    that weight is the quantized one, and the layer counts as used."""
    from mmpretrain.models.utils.attention import BEiTAttention
    gen = make_gen('beit')
    torch.manual_seed(3)
    float_module = BEiTAttention(8, 2, window_size=None,
                                 use_rel_pos_bias=False,
                                 bias='qv_bias').double().eval()
    with torch.no_grad():
        float_module.q_bias.normal_(), float_module.v_bias.normal_()
    wrapper = nn.Sequential(copy.deepcopy(float_module))
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   act_quantizer=None)
    rows = {r.layer: r.status for r in wrapper.mmdrq_report}
    assert rows['0'] == 'reads qkv.weight directly: quantized weight, FP input'
    owner = wrapper[0].eval()
    x = rand(gen, 2, 5, 8)
    for bit in BITS:
        set_bits(wrapper, bit)
        with recording_calls(wrapper) as called, torch.no_grad():
            out = owner(x)
        assert called == {'0.qkv', '0.proj'}
        w_qkv, _ = ref_weight(owner.qkv.weight,
                              owner.qkv.weight_quantizer.scale[0], 8, bit)
        w_proj, _ = ref_weight(owner.proj.weight,
                               owner.proj.weight_quantizer.scale[0], 8, bit)
        with torch.no_grad():
            ref = functional_call(float_module, {
                'qkv.weight': w_qkv, 'proj.weight': w_proj}, (x, ))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert isinstance(owner.qkv.weight, nn.Parameter)  # restored after



def test_owner_reading_a_grandchild_weight_gets_the_quantized_one():
    """TOOD's task decomposition reads ``self.reduction_conv.conv.weight``
    (a grandchild's) and multiplies it with its attention before a bmm: in
    its forward that weight is the quantized one."""
    from mmdet.models.dense_heads.tood_head import TaskDecomposition
    gen = make_gen('tood')
    torch.manual_seed(4)
    float_module = TaskDecomposition(4, 2, la_down_rate=2).double().eval()
    for param in float_module.parameters():
        with torch.no_grad():
            param.normal_()
    wrapper = nn.Sequential(copy.deepcopy(float_module))
    quantize_model(wrapper, bits=BITS, skip_first_last=False,
                   act_quantizer=None)
    rows = {r.layer: r.status for r in wrapper.mmdrq_report}
    assert rows['0'] == ('reads reduction_conv.conv.weight directly: '
                         'quantized weight, FP input')
    owner = wrapper[0].eval()
    layers = {name[2:]: layer
              for name, layer in quantized_layers(wrapper).items()}
    assert 'reduction_conv.conv' in layers
    x = rand(gen, 2, 8, 3, 3)
    for bit in BITS:
        set_bits(wrapper, bit)
        with recording_calls(wrapper) as called, torch.no_grad():
            out = owner(x)
        assert '0.reduction_conv.conv' in called
        reference_weights = {
            name + '.weight': ref_weight(
                layer.weight, layer.weight_quantizer.scale[0], 8, bit)[0]
            for name, layer in layers.items()}
        with torch.no_grad():
            ref = functional_call(float_module, reference_weights, (x, ))
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert isinstance(owner.reduction_conv.conv.weight, nn.Parameter)

class ReadsAndCalls(nn.Module):
    """An owner that reads its child's weight and also calls the child."""

    def __init__(self, child):
        super().__init__()
        self.child = child

    def forward(self, x):
        if isinstance(self.child, nn.Linear):
            read = F.linear(x, self.child.weight)
        else:
            read = F.conv1d(x, self.child.weight)
        return read + self.child(x)


@pytest.mark.parametrize('child', [lambda: nn.Linear(4, 4),
                                   lambda: nn.Conv1d(4, 4, 1)],
                         ids=['fused', 'swapped'])
def test_owner_reading_and_calling_a_child_quantizes_once(child):
    """The owner's swap and the child's own forward share one quantized
    weight: the weight quantizer runs once per forward, not on its own
    output."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(4, 4, 1), ReadsAndCalls(child()))
    quantize_model(model, bits=BITS, skip_first_last=False)
    layer = model[1].child
    assert model[1].mmdrq_weight_reads == ('child', )
    calls = []
    layer.weight_quantizer.register_forward_hook(
        lambda *args: calls.append(1))
    set_bits(model, 4)
    x = torch.randn(2, 4, 3, dtype=torch.float32)
    if isinstance(layer, nn.Linear):
        x = x.transpose(1, 2)
    out = model[1](x)  # training mode: no cached weight
    assert len(calls) == 1
    w_q = layer.weight_quantizer(layer.weight_to_quantize(), 4).detach()
    x_q = layer.act_quantizer(x, 4)
    op = F.linear if isinstance(layer, nn.Linear) else F.conv1d
    torch.testing.assert_close(out, op(x, w_q) + op(x_q, w_q, layer.bias))
    assert isinstance(layer.weight, nn.Parameter)  # restored after


def test_bad_quantizer_config_leaves_the_layer_float():
    """A quantizer that cannot be built fails the conversion naming it, and
    a layer converted in place keeps its float class."""
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.Conv2d(4, 2, 1))
    with pytest.raises(KeyError, match='NoSuchQuantizer'):
        quantize_model(model, skip_first_last=False,
                       act_quantizer=dict(type='NoSuchQuantizer'))
    assert type(model[0]) is nn.ConvTranspose2d
    assert not hasattr(model[0], 'weight_quantizer')


# --------------------------------------------------------- embeddings


class Embed(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.table = nn.Embedding(12, 6, padding_idx=0, **kwargs)
        self.proj = nn.Linear(6, 3)

    def forward(self, ids):
        return self.proj(self.table(ids))


def test_embedding_table_matches_float64_reference(tmp_path):
    """``embeddings=True``: the looked-up rows are the Double Rounded
    table's (float64, ties included) at every bit, ids never quantized;
    the backward reaches the table and its scales; integer export ->
    reload bit-exact. Off by default."""
    gen = make_gen('embedding')
    assert type(quantize_model(Embed(), skip_first_last=False).table) \
        is nn.Embedding
    model = quantize_model(Embed().double(), bits=list(BITS),
                           skip_first_last=False, embeddings=True)
    table = model.table
    assert isinstance(table, nn.Embedding) and table.act_quantizer is None
    ids = torch.randint(0, 12, (3, 5), generator=gen)
    model.train()
    for bit in BITS:
        set_bits(model, bit)
        model(ids)
    scale = table.weight_quantizer.scale[0].detach()
    with torch.no_grad():  # rows 1..4 on ties at 2 bits: q_8 = 64k + 32
        table.weight[1:5] = scale[1:5, None] * (64 * torch.randint(
            -2, 2, (4, 6), generator=gen, dtype=F64) + 32)
    for bit in BITS:
        set_bits(model, bit)
        ref, _ = ref_weight(table.weight, scale, BITS[0], bit)
        torch.testing.assert_close(table(ids), F.embedding(ids, ref),
                                   rtol=0, atol=1e-12)
    model(ids).square().sum().backward()
    assert table.weight.grad.abs().sum() > 0
    assert table.weight_quantizer.scale.grad.abs().sum() > 0
    twin = quantize_model(Embed().double(), bits=list(BITS),
                          skip_first_last=False, embeddings=True)
    save_int(model, str(tmp_path / 'int.pth'))
    load_int(twin, str(tmp_path / 'int.pth'))
    for bit in BITS:
        set_bits(model, bit), set_bits(twin, bit)
        assert torch.equal(model.table(ids), twin.table(ids))


def test_embedding_that_renormalizes_stays_float():
    model = quantize_model(Embed(max_norm=1.0), skip_first_last=False,
                           embeddings=True)
    assert type(model.table) is nn.Embedding
    assert isinstance(model.proj, QuantLayer)
