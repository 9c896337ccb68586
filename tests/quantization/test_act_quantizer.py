"""ActQuantizer against float64 references written here."""
import zlib

import numpy as np
import pytest
import torch

from mmdrq.quantization import ActQuantizer

# every test here runs on each fake-quant path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures('fake_quant_path')

F64 = torch.float64
BIT_SETS = [(8, 6, 4, 2), (4, 3, 2)]


def make_gen(*key):
    """A generator seeded from the test case, so every case gets new data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def qrange(b, signed):
    return (-2**(b - 1), 2**(b - 1) - 1) if signed else (0, 2**b - 1)


def ref_quant(x, s, b, signed):
    """clip(round_half_even(x / s)) * s in float64 numpy."""
    lo, hi = qrange(b, signed)
    q = np.clip(np.rint(x.numpy() / s), lo, hi)
    return torch.from_numpy(q * s), q


def ref_init(x, b, signed, pct=99.9):
    """Scale from the percentiles: hi / Qp, or max(|lo|, |hi|) / Qp."""
    lo, hi = np.percentile(x.numpy().ravel(), [100 - pct, pct])
    top = max(abs(lo), abs(hi)) if signed else max(hi, 0.0)
    return top / qrange(b, signed)[1]


def with_scales(bits, signed, scales):
    """A float64 quantizer whose scales are set (no lazy init)."""
    aq = ActQuantizer(bits, signed=signed).double()
    with torch.no_grad():
        aq.scale.copy_(torch.tensor(scales, dtype=F64))
        aq.initialized.fill_(True)
    return aq


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('signed', [False, True])
def test_lazy_init_and_forward_per_bit(bits, signed):
    """Each bit's scale is set from the percentile at its own first forward
    and kept afterwards; the output is the reference fake quantization."""
    gen = make_gen('init', bits, signed)
    aq = ActQuantizer(bits, signed=signed).double()
    for i, b in enumerate(bits):
        x = torch.randn(8, 4, 10, 10, generator=gen, dtype=F64) * (i + 1)
        if not signed:
            x = x.relu()
        assert not aq.initialized[i]
        out = aq(x, b)
        assert aq.initialized.tolist() == [j <= i for j in range(len(bits))]
        s = aq.scale[i].item()
        np.testing.assert_allclose(s, ref_init(x, b, signed), rtol=1e-5)
        ref, q = ref_quant(x, s, b, signed)
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
        assert q.max() == qrange(b, signed)[1]  # the top 0.1% is clipped
        assert (aq.scale[i + 1:] == 1).all()
        aq(3 * x, b)
        assert aq.scale[i].item() == s


def ref_mse_errors(x, b, signed, steps=100):
    """Candidate scales max|x| * k / (steps * Qp), k = 1..steps, and the
    mean squared error of each one's fake quantization, in float64."""
    top = np.abs(x.numpy()).max()
    scales = top * np.arange(1, steps + 1) / (steps * qrange(b, signed)[1])
    errors = [((ref_quant(x, s, b, signed)[0] - x)**2).mean().item()
              for s in scales]
    return scales, np.array(errors)


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('signed', [False, True])
def test_mse_init_per_bit(bits, signed):
    """init_method='mse': each bit's scale is the candidate of least
    quantization MSE on its first input (a float32 search: its error is the
    float64 minimum up to rounding); at 2 bits it clips far below the
    percentile init's, with a smaller error."""
    gen = make_gen('mse', bits, signed)
    aq = ActQuantizer(bits, signed=signed, init_method='mse').double()
    for i, b in enumerate(bits):
        # heavy tails, like activations: the max is far above the bulk
        x = torch.randn(8, 4, 10, 10, generator=gen, dtype=F64)**3 * (i + 1)
        if not signed:
            x = x.relu()
        aq(x, b)
        s = aq.scale[i].item()
        scales, errors = ref_mse_errors(x, b, signed)
        k = np.abs(scales - s).argmin()
        np.testing.assert_allclose(s, scales[k], rtol=1e-6)
        np.testing.assert_allclose(errors[k], errors.min(), rtol=1e-5)
        percentile = ref_init(x, b, signed)
        if b == 2:
            assert s < percentile
            assert errors[k] < ((ref_quant(x, percentile, b, signed)[0] -
                                 x)**2).mean().item()


def test_init_positive_for_zero_input():
    """An all-zero first input still gives a positive scale."""
    for method in ('percentile', 'mse'):
        aq = ActQuantizer((8, 4), signed=False, init_method=method)
        aq(torch.zeros(2, 3), 8)
        assert aq.scale[0].item() > 0


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('signed', [False, True])
def test_ranges_per_bit(bits, signed):
    """Integers cover exactly the unsigned [0, 2^b - 1] or signed
    [-2^(b-1), 2^(b-1) - 1] range; unsigned clips negatives to 0."""
    gen = make_gen('range', bits, signed)
    scales = [0.5 ** b for b in bits]
    aq = with_scales(bits, signed, scales)
    for b, s in zip(bits, scales):
        lo, hi = qrange(b, True)
        x = torch.randn(4, 300, generator=gen, dtype=F64) * 2 * hi * s
        x.view(-1)[:2] = torch.tensor([-4.0, 4.0]) * hi * s
        out = aq(x, b)
        ref, q = ref_quant(x, s, b, signed)
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
        q_out = (out / s).round()
        assert q_out.min() == qrange(b, signed)[0]
        assert q_out.max() == qrange(b, signed)[1]


@pytest.mark.parametrize('bits', BIT_SETS)
@pytest.mark.parametrize('signed', [False, True])
@pytest.mark.parametrize('shape', [(6, 3, 4, 4), (5, 7)])
def test_lsq_gradients(bits, signed, shape):
    """x grad = upstream inside the range; scale grad of the bit =
    g * sum(upstream * (q - v inside, Qn / Qp outside)),
    g = 1 / sqrt(numel(x[0]) * Qp); other bits get none."""
    gen = make_gen('grad', bits, signed, shape)
    scales = (0.1 + torch.rand(len(bits), generator=gen, dtype=F64)).tolist()
    aq = with_scales(bits, signed, scales)
    n = int(np.prod(shape[1:]))
    for i, b in enumerate(bits):
        lo, hi = qrange(b, signed)
        s = scales[i]
        x = torch.randn(shape, generator=gen, dtype=F64) * hi * s
        x.view(-1)[:3] = torch.tensor([0.5, -1.5, 2.5], dtype=F64) * s
        x = x.requires_grad_()
        aq.scale.grad = None
        out = aq(x, b)
        g_out = torch.randn(shape, generator=gen, dtype=F64)
        out.backward(g_out)
        v = x.detach() / s
        _, q = ref_quant(x.detach(), s, b, signed)
        inside = (v >= lo) & (v <= hi)
        assert not inside.all() and inside.any()
        torch.testing.assert_close(x.grad, g_out * inside, rtol=0, atol=0)
        local = torch.where(inside, torch.from_numpy(q) - v,
                            torch.where(v < lo, float(lo), float(hi)))
        ref = (g_out * local).sum() / (n * hi)**0.5
        torch.testing.assert_close(aq.scale.grad[i], ref, rtol=1e-10,
                                   atol=1e-12)
        others = [j for j in range(len(bits)) if j != i]
        assert (aq.scale.grad[others] == 0).all()


def test_auto_sign_kept_and_saved():
    """'auto' decides at the first forward, keeps the decision and saves it
    in the state dict; loading resets a decision already made."""
    gen = make_gen('auto')
    pos = torch.randn(4, 50, generator=gen).relu()
    neg = torch.randn(4, 50, generator=gen) - 0.5

    unsigned = ActQuantizer((8, 4))
    assert unsigned.state_dict()['signed'].item() == -1
    unsigned(pos, 8)
    assert unsigned.state_dict()['signed'].item() == 0
    assert unsigned(neg, 4).min() == 0  # still unsigned

    signed = ActQuantizer((8, 4))
    signed(neg, 8)
    assert signed.state_dict()['signed'].item() == 1
    out = signed(pos - 2, 4)  # init of bit 4 follows the signed rule
    s = signed.scale[1].item()
    np.testing.assert_allclose(
        s, ref_init((pos - 2).double(), 4, True), rtol=1e-5)
    assert out.min() < 0 and (out / s).round().min() >= -8

    fresh = ActQuantizer((8, 4))
    fresh.load_state_dict(unsigned.state_dict())
    assert fresh(neg, 4).min() == 0
    fresh.load_state_dict(signed.state_dict())
    assert fresh(neg, 4).min() < 0
    assert fresh.state_dict()['signed'].item() == 1


def test_state_dict_round_trip_keeps_init():
    """Loaded scales are used as they are; bits not initialised in the
    checkpoint initialise at their first forward after loading."""
    gen = make_gen('state')
    x1 = torch.randn(4, 3, 6, 6, generator=gen).relu()
    x2 = 5 * torch.randn(4, 3, 6, 6, generator=gen).relu()
    src = ActQuantizer((8, 6, 4))
    src(x1, 8)
    src(x1, 4)
    state = src.state_dict()

    dst = ActQuantizer((8, 6, 4))
    dst(x2, 8)  # initialised before loading: the load must win
    dst.load_state_dict(state)
    assert torch.equal(dst.initialized, torch.tensor([True, False, True]))
    assert torch.equal(dst(x2, 8), src(x2, 8))
    assert torch.equal(dst(x2, 4), src(x2, 4))
    assert torch.equal(dst.scale.detach(), src.scale.detach())
    dst(x2, 6)
    np.testing.assert_allclose(dst.scale[1].item(),
                               ref_init(x2.double(), 6, False), rtol=1e-5)
    assert dst.scale[0].item() == src.scale[0].item()


def test_bad_inputs_name_the_value():
    """Unknown bits, sign modes and percentiles raise errors naming them."""
    aq = ActQuantizer((8, 6, 4, 2))
    with pytest.raises(ValueError, match=r'\b5\b'):
        aq(torch.rand(2, 3), 5)
    with pytest.raises(ValueError, match='yes'):
        ActQuantizer((8, 4), signed='yes')
    for pct in (30.0, 101.0):
        with pytest.raises(ValueError, match=str(pct)):
            ActQuantizer((8, 4), init_percentile=pct)
    with pytest.raises(ValueError, match="init_method.*'max'"):
        ActQuantizer((8, 4), init_method='max')


@pytest.mark.parametrize('signed', [False, True])
def test_fixed_bit_quantizes_at_its_bit_whatever_the_layer_runs_at(signed):
    """``fixed_bit=8``: one scale, set at the first forward whatever bit
    the layer runs at, and 8-bit output at every bit of the layer."""
    gen = make_gen('fixed', signed)
    aq = ActQuantizer((8, 6, 4, 2), signed=signed, fixed_bit=8).double()
    assert aq.scale.shape == (1, )
    x = torch.randn(6, 40, generator=gen, dtype=F64)
    if not signed:
        x = x.relu()
    outs = [aq(x, b) for b in (2, 4, 6, 8)]  # initialised at bit 2
    s = aq.scale[0].item()
    np.testing.assert_allclose(s, ref_init(x, 8, signed), rtol=1e-5)
    ref, _ = ref_quant(x, s, 8, signed)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-14, atol=0)
    assert aq.grid(2) == (8, 0)
    with pytest.raises(ValueError, match=r'bit=5 is not one of'):
        aq(x, 5)


@pytest.mark.parametrize('fixed', [1, 17, '8', 8.0])
def test_bad_fixed_bit_is_named(fixed):
    with pytest.raises(ValueError, match=r'act_quantizer\.fixed_bit'):
        ActQuantizer((8, 4), fixed_bit=fixed)
