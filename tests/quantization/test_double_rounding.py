"""Double Rounding weight quantizer against float64 references written here.

References use numpy integer arithmetic for the second rounding, so they do
not share code with ``mmdrq.quantization.functional``.
"""
import zlib

import numpy as np
import pytest
import torch

from mmdrq.quantization import DoubleRoundingQuantizer, shared_rounding
from mmdrq.quantization.functional import (fake_quant, fake_quant_bits,
                                           quantize_int, requantize)

# every test here runs on each fake-quant path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('fake_quant_path')

BIT_SETS = [(8, 6, 4, 2), (4, 3, 2), (16, 8, 4, 2)]
F64 = torch.float64


def make_gen(*key):
    """A generator seeded from the test case, so every case gets new data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def srange(b):
    return -2**(b - 1), 2**(b - 1) - 1


def shift_round(q, d, mode):
    """Round int64 ``q / 2**d`` with integer ops: half_even, half_up, floor."""
    q = np.asarray(q, dtype=np.int64)
    if d == 0:
        return q
    half = 1 << (d - 1)
    if mode == 'half_up':
        return (q + half) >> d
    if mode == 'floor':
        return q >> d
    low = q >> d
    rem = q - (low << d)
    return low + ((rem > half) | ((rem == half) & (low % 2 == 1)))


def ref_ints(w, step_h, h, l, mode='half_even'):
    """q_l (int64 numpy) of float64 ``w`` with stored-grid scale ``step_h``."""
    q_h = np.clip(np.rint((w / step_h).numpy()), *srange(h)).astype(np.int64)
    return np.clip(shift_round(q_h, h - l, mode), *srange(l))


def ref_q(w, s, h, l, mode='half_even'):
    """``ref_ints`` as a float64 tensor; ``s`` is per channel or (1, )."""
    s = s.view(-1, *[1] * (w.dim() - 1)) if s.numel() > 1 else s
    return torch.from_numpy(ref_ints(w, s, h, l, mode)).to(F64)


def make_weight(gen, shape, h, pow2=True):
    """Weights whose ``W / s`` spans past the h-bit range, with exact ties
    of the first rounding (k + 0.5) and of the second (odd * 2**(d-1))."""
    c = shape[0]
    if pow2:
        s = 2.0**-torch.randint(2, 9, (c, ), generator=gen).to(F64)
    else:
        s = 0.01 + 0.1 * torch.rand(c, generator=gen, dtype=F64)
    v = torch.randn(shape, generator=gen, dtype=F64) * 0.7 * 2**(h - 1)
    flat = v.view(c, -1)
    n = 6
    flat[:, :n] = torch.randint(-2**(h - 1), 2**(h - 1), (c, n),
                                generator=gen).to(F64) + 0.5
    d = torch.randint(1, h - 1, (c, n), generator=gen)
    m = (torch.rand(c, n, generator=gen, dtype=F64) * 2.0**(h - d - 1)).floor()
    sign = torch.randint(0, 2, (c, n), generator=gen) * 2 - 1
    flat[:, n:2 * n] = sign * (2 * m + 1) * 2.0**(d - 1)
    return v * s.view(-1, 1, 1, 1), s


def fresh_quantizer(bits, s, **kwargs):
    """A float64 per-channel quantizer with scale ``s`` and no lazy init."""
    q = DoubleRoundingQuantizer(bits, num_channels=s.numel(), **kwargs)
    q.double()
    with torch.no_grad():
        q.scale.copy_(s.expand_as(q.scale))
        q.initialized.fill_(True)
    return q


ROUND_ONCE = {'half_even': np.rint, 'half_up': lambda v: np.floor(v + 0.5),
              'floor': np.floor}


def ref_grads(w, step, l, q_l, g_out, residual='double_rounded',
              mode='half_even'):
    """STE weight grad and the un-reduced LSQ scale grad of bit l: inside
    the range ``q_l - v`` (double_rounded) or, for first_rounding, v
    rounded once by ``mode`` minus v (numpy's rint for half_even)."""
    lo, hi = srange(l)
    v = w / step
    inside = (v >= lo) & (v <= hi)
    integer = q_l if residual == 'double_rounded' else \
        torch.from_numpy(ROUND_ONCE[mode](v.numpy()))
    local = torch.where(inside, integer - v,
                        torch.where(v < lo, float(lo), float(hi)))
    return g_out * inside, g_out * local


def quantizer_case(tag, bits, variant, rounding, scale_grad, reduce,
                   residual='double_rounded'):
    """Fresh data (ties included) and a float64 quantizer for one case:
    generator, weight ``(5, 2, 3, 3)``, scale, quantizer, rounding mode."""
    gen = make_gen(tag, bits, variant, rounding, scale_grad, reduce,
                   residual)
    w, s = make_weight(gen, (5, 2, 3, 3), bits[0], pow2=scale_grad == 'lsq')
    quant = fresh_quantizer(bits, s, variant=variant, rounding=rounding,
                            scale_grad=scale_grad, scale_grad_reduce=reduce,
                            scale_grad_residual=residual)
    return gen, w, s, quant, 'floor' if variant == 'floor' else rounding


def ref_scale_grad(local, l, d, reduce, scale_grad):
    """LSQ scale grad of the ``(5, 2, 3, 3)`` case from ``ref_grads``'s
    un-reduced ``local``: summed per channel or over the whole tensor for
    every channel, times g = 1 / sqrt(N * Qp), and 2**d if 'exact'."""
    gs = local.sum(dim=(1, 2, 3)) if reduce == 'channel' else \
        local.sum().expand(5)
    gs = gs / (local[0].numel() * srange(l)[1])**0.5
    return gs * 2**d if scale_grad == 'exact' else gs


@pytest.mark.parametrize('h', [8, 4, 16])
def test_first_rounding_half_even_and_clip(h):
    """q_h = clip(round_half_even(W / s)) on the signed h-bit grid."""
    w, s = make_weight(make_gen('first', h), (5, 3, 3, 3), h)
    s4 = s.view(-1, 1, 1, 1)
    q = quantize_int(w, s4, srange(h), 0, srange(h))
    v = (w / s4).numpy()
    ref = np.clip(np.rint(v), *srange(h))
    np.testing.assert_array_equal(q.numpy(), ref)
    ties = v - np.floor(v) == 0.5
    assert ties.sum() >= 10
    inner = ties & (np.abs(v) < 2**(h - 1) - 1)
    assert (q.numpy()[inner] % 2 == 0).all()
    assert q.min() == srange(h)[0] and q.max() == srange(h)[1]


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('variant,rounding', [('double_rounding', 'half_even'),
                                              ('double_rounding', 'half_up'),
                                              ('floor', 'half_even')])
def test_quantize_int_every_bit(bits, variant, rounding):
    """Both roundings and the clipping at every bit, vs integer arithmetic."""
    h = bits[0]
    w, s = make_weight(make_gen('int', bits, variant, rounding),
                       (4, 3, 3, 3), h, pow2=rounding == 'half_up')
    s4 = s.view(-1, 1, 1, 1)
    mode = 'floor' if variant == 'floor' else rounding
    for l in bits:
        q = quantize_int(w, s4, srange(h), h - l, srange(l), rounding, variant)
        ref = ref_ints(w, s4, h, l, mode)
        np.testing.assert_array_equal(q.numpy(), ref, err_msg=f'bit {l}')
        assert ref.min() == srange(l)[0] and ref.max() == srange(l)[1]


@pytest.mark.parametrize('bits', BIT_SETS)
def test_bit_l_is_bit_h_rerounded(bits):
    """quantize_int at bit l == requantize(q_h, d), also via ``integers``."""
    h = bits[0]
    w, s = make_weight(make_gen('rel', bits), (4, 2, 3, 3), h, pow2=False)
    s4 = s.view(-1, 1, 1, 1)
    q_h = quantize_int(w, s4, srange(h), 0, srange(h))
    quant = fresh_quantizer(bits, s.float()).float()
    stored = quant.integers(w.float())
    assert stored.dtype == torch.int32
    for l in bits:
        d, (lo, hi) = h - l, srange(l)
        direct = quantize_int(w, s4, srange(h), d, srange(l))
        torch.testing.assert_close(direct, requantize(q_h, d, lo, hi),
                                   rtol=0, atol=0)
        via_module = quant.integers(w.float(), l)
        torch.testing.assert_close(
            via_module, requantize(stored, d, lo, hi).to(torch.int32),
            rtol=0, atol=0)


@pytest.mark.parametrize('d', [1, 2, 4, 6])
def test_second_rounding_ties(d):
    """q_h / 2**d == k + 0.5 exactly: half_up is the integer shift, half_even
    goes to the even neighbour, floor is the arithmetic right shift."""
    k = torch.arange(-40, 40, dtype=torch.int64)
    q_h = 2**(d - 1) * (2 * k + 1)
    wide = (-10**6, 10**6)
    up = requantize(q_h, d, *wide, rounding='half_up')
    even = requantize(q_h, d, *wide, rounding='half_even')
    floor = requantize(q_h, d, *wide, variant='floor')
    shifted = (q_h + 2**(d - 1)) >> d
    assert shifted.tolist() == [(int(q) + (1 << (d - 1))) >> d
                                for q in q_h.tolist()]
    assert up.to(torch.int64).tolist() == shifted.tolist()
    assert floor.to(torch.int64).tolist() == (q_h >> d).tolist()
    assert (even.to(torch.int64) % 2 == 0).all()
    torch.testing.assert_close((even - q_h.double() / 2**d).abs(),
                               torch.full((80, ), 0.5, dtype=F64))
    # they differ exactly where k is even (half_even keeps k, half_up k + 1)
    assert torch.equal(even != up, k % 2 == 0)
    clipped = requantize(q_h, d, -3, 2, rounding='half_up')
    assert clipped.min() == -3 and clipped.max() == 2


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('variant,rounding', [('double_rounding', 'half_even'),
                                              ('double_rounding', 'half_up'),
                                              ('floor', 'half_even')])
@pytest.mark.parametrize('scale_grad', ['lsq', 'exact'])
@pytest.mark.parametrize('reduce', ['channel', 'tensor'])
@pytest.mark.parametrize('residual', ['double_rounded', 'first_rounding'])
def test_quantizer_forward_and_grads(bits, variant, rounding, scale_grad,
                                     reduce, residual):
    """Forward q_l * s * 2**d; STE weight grad; LSQ scale grad with
    g = 1 / sqrt(N * Qp), times 2**d if 'exact', summed per channel or
    (reduce 'tensor') over the whole tensor for every channel, with the
    residual's integer q_l or round(v)."""
    h = bits[0]
    gen, w, s, quant, mode = quantizer_case('fwd', bits, variant, rounding,
                                            scale_grad, reduce, residual)
    for l in bits:
        d = h - l
        step = (s * 2**d).view(-1, 1, 1, 1)
        q_l = ref_q(w, s, h, l, mode)
        x = w.clone().requires_grad_()
        quant.scale.grad = None
        out = quant(x, l)
        torch.testing.assert_close(out, q_l * step, rtol=1e-14, atol=0)
        g_out = torch.randn(w.shape, generator=gen, dtype=F64)
        out.backward(g_out)
        gw, gs = ref_grads(w, step, l, q_l, g_out, residual, mode)
        torch.testing.assert_close(x.grad, gw, rtol=0, atol=0)
        torch.testing.assert_close(
            quant.scale.grad[0], ref_scale_grad(gs, l, d, reduce, scale_grad),
            rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('variant,rounding', [('double_rounding', 'half_even'),
                                              ('double_rounding', 'half_up'),
                                              ('floor', 'half_even')])
@pytest.mark.parametrize('scale_grad,reduce,residual', [
    ('lsq', 'channel', 'first_rounding'), ('exact', 'tensor', 'double_rounded')])
def test_shared_rounding_sums_every_bit(bits, variant, rounding, scale_grad,
                                        reduce, residual):
    """Under ``shared_rounding`` one call serves every bit: each forward
    is the reference of its bit, and one backward of a summed loss gives
    the sums of the bits' reference gradients, with a bit used twice and
    the lowest one unused."""
    h = bits[0]
    gen, w, s, quant, mode = quantizer_case('shared', bits, variant,
                                            rounding, scale_grad, reduce,
                                            residual)
    x = w.clone().requires_grad_()
    used = [*bits[:-1], bits[0]]
    total, gw_ref, gs_ref = 0, 0, 0
    with shared_rounding(quant):
        for l in used:
            d = h - l
            step = (s * 2**d).view(-1, 1, 1, 1)
            q_l = ref_q(w, s, h, l, mode)
            out = quant(x, l)
            assert out is quant(x, l)  # made once, handed out
            torch.testing.assert_close(out, q_l * step, rtol=1e-14, atol=0)
            g_out = torch.randn(w.shape, generator=gen, dtype=F64)
            total = total + (out * g_out).sum()
            gw, gs = ref_grads(w, step, l, q_l, g_out, residual, mode)
            gw_ref = gw_ref + gw
            gs_ref = gs_ref + ref_scale_grad(gs, l, d, reduce, scale_grad)
    assert quant._shared is None
    total.backward()
    # the same terms, added in another order
    torch.testing.assert_close(x.grad, gw_ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(quant.scale.grad[0], gs_ref, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize('bits', [(8, 6, 4, 2), (4, 3, 2)])
@pytest.mark.parametrize('reduce', ['channel', 'tensor'])
def test_first_rounding_residual_at_every_lower_bit(bits, reduce):
    """``scale_grad_residual='first_rounding'``: at every l < h the scale
    gradient is g * sum(grad * (round(v) - v)) inside the range (limit
    outside), v = W / (s * 2**d), against float64 numpy on fresh data with
    ties of round(v) built for that d; the data also has weights where
    round(v) != q_l, so the double-rounded residual would fail here."""
    h = bits[0]
    for l in bits[1:]:
        d = h - l
        gen = make_gen('residual', bits, reduce, l)
        w, s = make_weight(gen, (5, 2, 3, 3), h)
        flat = (w / s.view(-1, 1, 1, 1)).view(5, -1)  # W / s, exact (pow2 s)
        m = torch.randint(-2**(l - 1), 2**(l - 1) - 1, (5, 4), generator=gen)
        flat[:, -4:] = (m.to(F64) + 0.5) * 2**d  # v = m + 0.5: ties
        # even m, v = m + 0.5 + 0.25 / 2**d: q_h = 2**d (m + 0.5) goes to
        # q_l = m (the even neighbour), round(v) = m + 1
        m = 2 * torch.randint(-2**(l - 2), 2**(l - 2), (5, 4), generator=gen)
        flat[:, -8:-4] = (m.to(F64) + 0.5) * 2**d + 0.25
        w = flat.view(w.shape) * s.view(-1, 1, 1, 1)
        quant = fresh_quantizer(bits, s, scale_grad_reduce=reduce,
                                scale_grad_residual='first_rounding')
        step = (s * 2**d).view(-1, 1, 1, 1)
        v = (w / step).numpy()
        q_l = ref_q(w, s, h, l)
        inside = (v >= srange(l)[0]) & (v <= srange(l)[1])
        assert (inside & (v - np.floor(v) == 0.5)).sum() >= 20
        assert (inside & (np.rint(v) != q_l.numpy())).any()
        x = w.clone().requires_grad_()
        out = quant(x, l)
        g_out = torch.randn(w.shape, generator=gen, dtype=F64)
        out.backward(g_out)
        gw, gs = ref_grads(w, step, l, q_l, g_out, 'first_rounding')
        torch.testing.assert_close(x.grad, gw, rtol=0, atol=0)
        torch.testing.assert_close(
            quant.scale.grad[0], ref_scale_grad(gs, l, d, reduce, 'lsq'),
            rtol=1e-10, atol=1e-12)


def test_residuals_of_one_weight_differ_in_sign():
    """h=8, l=6, s=1, W=2.2, exact: v = 0.55, q_h = 2 re-rounds to q_l = 0
    (half to even) while round(v) = 1, so the scale gradients are
    -0.55 * 4 / sqrt(31) and +0.45 * 4 / sqrt(31)."""
    grads = {}
    for residual in ('double_rounded', 'first_rounding'):
        quant = DoubleRoundingQuantizer((8, 6), scale_grad='exact',
                                        scale_grad_residual=residual)
        quant.double()
        with torch.no_grad():
            quant.scale.fill_(1.0)
            quant.initialized.fill_(True)
        quant(torch.tensor([2.2], dtype=F64), 6).sum().backward()
        grads[residual] = quant.scale.grad.item()
    assert grads['double_rounded'] == pytest.approx(-0.55 * 4 / 31**0.5)
    assert grads['first_rounding'] == pytest.approx(0.45 * 4 / 31**0.5)


def test_shared_rounding_follows_weight_updates():
    """An in-place weight update in the block (version counter) makes new
    outputs; a bit outside ``bits`` still raises; the unshared baseline
    keeps computing per call."""
    gen = make_gen('shared_update')
    w, s = make_weight(gen, (4, 2, 3, 3), 8)
    quant = fresh_quantizer((8, 4), s)
    unshared = DoubleRoundingQuantizer((8, 4), num_channels=4,
                                       variant='unshared').double()
    with shared_rounding(torch.nn.ModuleList([quant, unshared])):
        first = quant(w, 4)
        w.mul_(0.5)
        second = quant(w, 4)
        assert second is not first
        step = (s * 16).view(-1, 1, 1, 1)
        torch.testing.assert_close(second, ref_q(w, s, 8, 4) * step,
                                   rtol=1e-14, atol=0)
        with pytest.raises(ValueError, match=r'\b5\b'):
            quant(w, 5)
        assert unshared(w, 4) is not unshared(w, 4)
        assert unshared._shared is None
        with shared_rounding(quant):  # nested: the outer block's outputs
            assert quant(w, 4) is second
        assert quant.sharing and quant(w, 4) is second
    assert not quant.sharing


@pytest.mark.parametrize('per_channel', [True, False])
def test_fake_quant_bits_equals_calls_per_target(per_channel):
    """``fake_quant_bits`` against one ``fake_quant`` per target: the same
    outputs, and the summed gradients, for float32 data full of ties."""
    gen = make_gen('bits_api', per_channel)
    rows = 6 if per_channel else 1
    w = torch.randint(-300, 300, (6, 40), generator=gen).float() / 8
    s = torch.rand(rows, 1, generator=gen) * 0.2 + 0.05
    targets = [(0, srange(8), 0.5), (2, srange(6), 0.25), (4, srange(4), 2.)]
    dims = (1,) if per_channel else None
    grads = [torch.randn(w.shape, generator=gen) for _ in targets]
    x1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    outs = fake_quant_bits(x1, s1, srange(8), targets, reduce_dims=dims)
    sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    x2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    for out, (shift, l_range, g), grad in zip(outs, targets, grads):
        ref = fake_quant(x2, s2, srange(8), shift, l_range, grad_scale=g,
                         reduce_dims=dims)
        assert torch.equal(out, ref)
        ref.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='at least one target'):
        fake_quant_bits(w, s, srange(8), [])


class _NoGrad(torch.autograd.Function):
    """Passes its input on and gives it no gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


def test_fake_quant_bits_when_no_output_gets_a_gradient():
    """Outputs used only where no gradient flows back: the backward runs
    and leaves ``x`` and ``scale`` without gradients."""
    x = torch.randn(4, 6, requires_grad=True)
    s = torch.full((4, 1), 0.1, requires_grad=True)
    outs = fake_quant_bits(x, s, srange(8), [(0, srange(8), 1.0),
                                              (2, srange(6), 1.0)],
                           reduce_dims=(1,))
    loss = sum(_NoGrad.apply(o).sum() for o in outs) + (x * 0).sum()
    loss.backward()
    assert s.grad is None
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize('bits', [(8, 6, 4), (4, 3, 2)])
def test_per_tensor_scale(bits):
    """One scale for the tensor: g = 1 / sqrt(numel * Qp), whole sum; the
    default residual round(v) - v."""
    h = bits[0]
    gen = make_gen('per_tensor', bits)
    w = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    quant = DoubleRoundingQuantizer(bits).double()
    with torch.no_grad():
        quant.scale.fill_(2.5 / 2**(h - 1))
        quant.initialized.fill_(True)
    s = quant.scale.detach().view(1)
    for l in bits:
        step = s * 2**(h - l)
        q_l = ref_q(w, s, h, l)
        x = w.clone().requires_grad_()
        quant.scale.grad = None
        out = quant(x, l)
        torch.testing.assert_close(out, q_l * step, rtol=1e-14, atol=0)
        g_out = torch.randn(w.shape, generator=gen, dtype=F64)
        out.backward(g_out)
        gw, gs = ref_grads(w, step, l, q_l, g_out, 'first_rounding')
        torch.testing.assert_close(x.grad, gw, rtol=0, atol=0)
        gs = gs.sum().view(1, 1) / (60 * srange(l)[1])**0.5
        torch.testing.assert_close(quant.scale.grad, gs, rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize('bits', [(8, 6, 4, 2), (4, 3, 2)])
def test_scale_init(bits):
    """Per channel max(|mu - 3 sigma|, |mu + 3 sigma|) / 2**(h-1) with the
    population std, made at h even when the first forward is at the lowest
    bit; per tensor 2 mean|W| / sqrt(Qp)."""
    h = bits[0]
    gen = make_gen('init', bits)
    w = torch.randn(6, 3, 3, 3, generator=gen, dtype=F64) * 0.1
    w += 0.05 * torch.randn(6, 1, 1, 1, generator=gen, dtype=F64)
    quant = DoubleRoundingQuantizer(bits, num_channels=6)
    quant(w.float(), bits[-1])
    flat = w.view(6, -1).numpy()
    mu, sigma = flat.mean(1), flat.std(1, ddof=0)
    ref = np.maximum(np.abs(mu - 3 * sigma), np.abs(mu + 3 * sigma))
    np.testing.assert_allclose(quant.scale[0].detach().numpy(),
                               ref / 2**(h - 1), rtol=1e-5)
    assert quant.initialized.all()
    before = quant.scale.detach().clone()
    quant(2 * w.float(), h)  # no re-init on later forwards
    assert torch.equal(quant.scale.detach(), before)

    tensor_q = DoubleRoundingQuantizer(bits)
    tensor_q(w.float(), bits[-1])
    ref = 2 * np.abs(flat).mean() / np.sqrt(2**(h - 1) - 1)
    np.testing.assert_allclose(tensor_q.scale.detach().numpy(), [[ref]],
                               rtol=1e-5)


def test_unshared_variant():
    """One scale per bit, initialised at that bit; plain LSQ at that bit."""
    bits = (8, 6, 4, 2)
    gen = make_gen('unshared')
    w = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64) * 0.1
    quant = DoubleRoundingQuantizer(bits, num_channels=4,
                                    variant='unshared').double()
    assert quant.scale.shape == (4, 4)
    flat = w.view(4, -1).numpy()
    mu, sigma = flat.mean(1), flat.std(1, ddof=0)
    bound = np.maximum(np.abs(mu - 3 * sigma), np.abs(mu + 3 * sigma))
    for i, l in enumerate(bits):
        quant.scale.grad = None
        x = w.clone().requires_grad_()
        out = quant(x, l)
        assert quant.initialized.tolist() == [j <= i for j in range(4)]
        s = quant.scale[i].detach()
        np.testing.assert_allclose(s.numpy(), bound / 2**(l - 1), rtol=1e-5)
        step = s.view(-1, 1, 1, 1)
        q_l = ref_q(w, s, l, l)
        torch.testing.assert_close(out, q_l * step, rtol=1e-14, atol=0)
        g_out = torch.randn(w.shape, generator=gen, dtype=F64)
        out.backward(g_out)
        gw, gs = ref_grads(w, step, l, q_l, g_out)
        torch.testing.assert_close(x.grad, gw, rtol=0, atol=0)
        gs = gs.sum(dim=(1, 2, 3)) / (w[0].numel() * srange(l)[1])**0.5
        torch.testing.assert_close(quant.scale.grad[i], gs, rtol=1e-10,
                                   atol=1e-12)
        others = [j for j in range(4) if j != i]
        assert (quant.scale.grad[others] == 0).all()


def test_bad_inputs_name_the_value():
    """Unknown bits, variants and roundings raise errors naming the value."""
    quant = DoubleRoundingQuantizer((8, 6, 4, 2), num_channels=2)
    w = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r'\b5\b'):
        quant(w, 5)
    with pytest.raises(ValueError, match=r'\b3\b'):
        quant.integers(w, 3)
    for key, value in [('variant', 'round'), ('rounding', 'nearest'),
                       ('scale_grad', 'approx'),
                       ('scale_grad_reduce', 'global'),
                       ('scale_grad_residual', 'rounded')]:
        with pytest.raises(ValueError, match=value):
            DoubleRoundingQuantizer((8, 4), **{key: value})
    for key, value in [('rounding', 'half_down'), ('variant', 'truncate')]:
        with pytest.raises(ValueError, match=value):
            fake_quant(w, torch.ones(1), srange(8), 2, srange(6),
                       **{key: value})
        with pytest.raises(ValueError, match=value):
            requantize(torch.arange(4.), 0, -2, 1, **{key: value})
    with pytest.raises(ValueError, match='q_l'):
        fake_quant(w, torch.ones(1), srange(8), 2, srange(6), residual='q_l')
    with pytest.raises(ValueError, match='1'):
        DoubleRoundingQuantizer((4, 1))
