"""QConv2d / QLinear against F.conv2d / F.linear on reference-quantized
float64 inputs and weights, plus the eval-mode weight cache."""
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmdrq.quantization import QConv2d, QLinear
from conftest import ref_act, ref_weight

# every test here runs on each fake-quant path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('fake_quant_path')

F64 = torch.float64
BIT_SETS = [(8, 6, 4, 2), (4, 3, 2)]


def make_gen(*key):
    """A generator seeded from the test case, so every case gets new data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def ref_conv(x, w, conv):
    if conv.padding_mode != 'zeros':
        x = F.pad(x, conv._reversed_padding_repeated_twice,
                  mode=conv.padding_mode)
        return F.conv2d(x, w, conv.bias, conv.stride, 0, conv.dilation,
                        conv.groups)
    return F.conv2d(x, w, conv.bias, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


CONV_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2,
         bias=False),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=2, dilation=2,
         groups=6),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 1), stride=(2, 1),
         padding=(1, 0), dilation=(1, 2), groups=4, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1,
         padding_mode='reflect'),
]


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('case', range(len(CONV_CASES)))
def test_qconv2d_matches_reference(bits, case):
    """Train and eval outputs equal F.conv2d on reference-quantized input and
    weight at every bit."""
    gen = make_gen('conv', bits, case)
    conv = nn.Conv2d(**CONV_CASES[case], dtype=F64)
    layer = QConv2d.from_float(conv, bits).double()
    x = torch.randn(2, conv.in_channels, 9, 8, generator=gen,
                    dtype=F64).relu()
    outs = {}
    for b in bits:
        layer.set_bit(b)
        outs[b] = layer(x)
    layer.eval()
    s = layer.weight_quantizer.scale[0]
    assert s.shape == (conv.out_channels, )
    for b in bits:
        wq, _ = ref_weight(conv.weight, s, bits[0], b)
        ref = ref_conv(ref_act(x, layer, b), wq, conv)
        torch.testing.assert_close(outs[b], ref, rtol=1e-12, atol=1e-12)
        layer.set_bit(b)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape,relu', [((8, 12), True), ((3, 7, 12), False)])
def test_qlinear_matches_reference(bits, bias, shape, relu):
    """QLinear equals F.linear on reference-quantized input (unsigned or
    signed) and weight at every bit."""
    gen = make_gen('linear', bits, bias, shape)
    linear = nn.Linear(12, 5, bias=bias, dtype=F64)
    layer = QLinear.from_float(linear, bits).double()
    x = torch.randn(*shape, generator=gen, dtype=F64)
    x = x.relu() if relu else x
    for b in bits:
        layer.set_bit(b)
        out = layer(x)
        assert int(layer.act_quantizer.signed) == (not relu)
        wq, _ = ref_weight(linear.weight, layer.weight_quantizer.scale[0],
                           bits[0], b)
        ref = F.linear(ref_act(x, layer, b), wq, linear.bias)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_from_float_shares_parameters():
    """from_float wraps the original Parameter objects, keeps the mode and
    passes the quantizer configs on."""
    conv = nn.Conv2d(3, 4, 3, bias=False).eval()
    qconv = QConv2d.from_float(
        conv, (4, 3, 2),
        weight_quantizer=dict(type='DoubleRoundingQuantizer',
                              variant='floor'), act_quantizer=None)
    assert qconv.weight is conv.weight and qconv.bias is None
    assert not qconv.training and qconv.bit == 4
    assert qconv.weight_quantizer.variant == 'floor'
    assert qconv.weight_quantizer.bits == (4, 3, 2)
    assert qconv.act_quantizer is None
    linear = nn.Linear(6, 3)
    qlinear = QLinear.from_float(linear, (8, 4))
    assert qlinear.weight is linear.weight and qlinear.bias is linear.bias
    assert qlinear.training
    assert {id(p) for p in linear.parameters()} <= \
        {id(p) for p in qlinear.parameters()}
    with pytest.raises(ValueError, match=r'\b6\b'):
        qlinear.set_bit(6)


def test_eval_weight_cache():
    """Eval without autograd: one tensor until the weight (in place or by an
    optimizer step), the scale, the bit or the mode changes. Writes through
    ``.data`` bypass version counters: re-entering eval() refreshes."""
    gen = make_gen('cache')
    conv = nn.Conv2d(3, 4, 3, dtype=F64)
    layer = QConv2d.from_float(conv, (8, 6, 4, 2)).double().eval()
    wq = layer.weight_quantizer
    x = torch.rand(2, 3, 6, 6, generator=gen, dtype=F64)

    def check(w_cached, bit=None):
        ref, _ = ref_weight(layer.weight, wq.scale[0], 8, bit or layer.bit)
        torch.testing.assert_close(w_cached, ref, rtol=1e-14, atol=0)

    with torch.no_grad():
        layer(x)
        w1 = layer.quantized_weight()
        assert layer.quantized_weight() is w1
        check(w1)
        layer.weight.add_(0.3 * torch.randn(layer.weight.shape,
                                            generator=gen, dtype=F64))
        w2 = layer.quantized_weight()
        assert w2 is not w1 and not torch.equal(w2, w1)
        check(w2)
        torch.testing.assert_close(
            layer(x), ref_conv(ref_act(x, layer, 8), w2, conv))
        wq.scale.mul_(1.5)
        w3 = layer.quantized_weight()
        assert w3 is not w2
        check(w3)
        wq.scale.data.mul_(0.5)
        assert layer.quantized_weight() is w3  # .data: not seen ...
        layer.eval()  # ... until the mode is set again
        w4 = layer.quantized_weight()
        assert w4 is not w3
        check(w4)
        layer.set_bit(4)
        w5 = layer.quantized_weight()
        check(w5, 4)
        layer.set_bit(8)
        w6 = layer.quantized_weight()
        assert w6 is not w5 and layer.quantized_weight() is w6
        torch.testing.assert_close(w6, w4, rtol=0, atol=0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.weight.grad = torch.randn(layer.weight.shape, generator=gen,
                                    dtype=F64)
    opt.step()
    with torch.no_grad():
        w7 = layer.quantized_weight()
        assert w7 is not w6
        check(w7)
        layer.train()
        layer.eval()
        w8 = layer.quantized_weight()
        assert w8 is not w7
        torch.testing.assert_close(w8, w7, rtol=0, atol=0)
    # with autograd or in training there is no cache
    assert layer.quantized_weight() is not layer.quantized_weight()
    layer.train()
    with torch.no_grad():
        assert layer.quantized_weight() is not layer.quantized_weight()


@pytest.mark.parametrize('bit', [8, 6, 4, 2])
def test_training_gradients(bit):
    """Training forward: gradients reach the weight (STE, vs a float64
    reference), the weight scale and only this bit's activation scale."""
    gen = make_gen('train', bit)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, dtype=F64)
    layer = QConv2d.from_float(conv, (8, 6, 4, 2)).double()
    layer.set_bit(bit)
    x = torch.randn(3, 4, 7, 7, generator=gen, dtype=F64).relu()
    layer(x)  # initialise the scales
    with torch.no_grad():  # shrink the weight scale: some weights clip
        layer.weight_quantizer.scale.mul_(0.5)
    g_out = torch.randn(3, 6, 7, 7, generator=gen, dtype=F64)
    layer.zero_grad()
    (layer(x) * g_out).sum().backward()
    torch.testing.assert_close(conv.bias.grad, g_out.sum(dim=(0, 2, 3)))
    w_grad = conv.weight.grad.clone()
    wq, mask = ref_weight(conv.weight, layer.weight_quantizer.scale[0], 8,
                          bit)
    assert mask.any() and not mask.all()
    wq.requires_grad_()
    (ref_conv(ref_act(x, layer, bit), wq, conv) * g_out).sum().backward()
    torch.testing.assert_close(w_grad, wq.grad * mask, rtol=1e-12,
                               atol=1e-12)
    assert (layer.weight_quantizer.scale.grad != 0).all()
    act_grad = layer.act_quantizer.scale.grad
    index = (8, 6, 4, 2).index(bit)
    assert act_grad[index] != 0
    assert (act_grad[[i for i in range(4) if i != index]] == 0).all()


@pytest.mark.parametrize('layer_type', ['conv', 'linear'])
def test_quantized_operands_are_saved_as_recipes(layer_type, monkeypatch):
    """Training keeps no copy of the fake-quantized input and weight for
    the backward (they are recomputed there), with the same gradients as
    keeping them, and double backward still sees them as functions of the
    input (Hessian traces)."""
    import contextlib
    import gc
    import weakref
    gen = make_gen('recipes', layer_type)
    if layer_type == 'conv':
        layer = QConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), (8, 4))
        x = torch.randn(3, 4, 7, 7, generator=gen)
    else:
        layer = QLinear.from_float(nn.Linear(5, 3), (8, 4))
        x = torch.randn(6, 5, generator=gen)
    layer.set_bit(4)
    layer(x)  # initialise the scales
    kept = []
    for quantizer in (layer.act_quantizer, layer.weight_quantizer):
        quantizer.register_forward_hook(
            lambda m, args, out: kept.append(weakref.ref(out)))

    def grads(recipes):
        if not recipes:
            monkeypatch.setattr(type(layer), 'saved_as_recipes',
                                lambda *args: contextlib.nullcontext())
        layer.zero_grad()
        kept.clear()
        xx = x.clone().requires_grad_()
        out = layer(xx)
        gc.collect()
        alive = [ref() is not None for ref in kept]
        out.square().sum().backward()
        monkeypatch.undo()
        return alive, [xx.grad] + [p.grad for p in layer.parameters()]
    alive_with, with_recipes = grads(True)
    alive_without, without = grads(False)
    # without recipes the op keeps x_q (the weight may be kept as a view,
    # w_q.t(), which does not keep w_q's Python object alive)
    assert alive_with == [False, False] and alive_without[0]
    for a, b in zip(with_recipes, without):
        assert torch.equal(a, b)
    # double backward: d/dx of (d loss / d weight) needs x_q(x) with a graph
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    g_w, = torch.autograd.grad(layer(xx).square().sum(), layer.weight,
                               create_graph=True)
    g_x, = torch.autograd.grad(g_w.sum(), xx)
    assert g_x.abs().sum() > 0
