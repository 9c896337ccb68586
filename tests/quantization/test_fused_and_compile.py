"""The fused fake-quant kernels and whole-model torch.compile.

The float64 references of test_double_rounding/test_act_quantizer/test_layers
already run on both paths (``fake_quant_path``); this checks what those do
not: that the fused kernels really run, agree with the torch path in float32
and bfloat16, are built once for every bit and layer, and that a compiled
model trains like the eager one.
"""
import zlib

import pytest
import torch

import mmdrq
from mmdrq.quantization import functional, fused_kernels
from mmdrq.models.multi_precision import CPU_COMPILE_OPTIONS
from mmdrq.quantization.functional import fake_quant, fake_quant_impl

PLANS = [  # (h_range, shift, l_range, rounding, variant)
    ((-128, 127), 0, (-128, 127), 'half_even', 'double_rounding'),
    ((-128, 127), 4, (-8, 7), 'half_even', 'double_rounding'),
    ((-128, 127), 6, (-2, 1), 'half_up', 'double_rounding'),
    ((-8, 7), 1, (-4, 3), 'half_even', 'floor'),
    ((0, 255), 0, (0, 255), 'half_even', 'double_rounding'),
    # the stored grid with the other second roundings, which must change
    # nothing there
    ((-8, 7), 0, (-8, 7), 'half_up', 'double_rounding'),
    ((-8, 7), 0, (-8, 7), 'half_even', 'floor'),
    # shift 0 onto a narrower range: the two-pass path
    ((-128, 127), 0, (-8, 7), 'half_even', 'double_rounding'),
]


def tie_tensor(gen, shape, scale, dtype):
    """Values ``scale * k / 4``: exact ties of the first rounding and of
    every second rounding, past both ends of the grids."""
    k = torch.randint(-1200, 1200, shape, generator=gen)
    return (k.double() / 4 * scale).to(dtype)


def run(impl, x, scale, plan, reduce_dims, grad):
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    with fake_quant_impl(impl):
        out = fake_quant(x, scale, plan[0], plan[1], plan[2], plan[3],
                         plan[4], 0.25, reduce_dims)
        out.backward(grad)
    return out.detach(), x.grad, scale.grad


@pytest.mark.parametrize('plan', PLANS)
@pytest.mark.parametrize('case', ['weight_channel', 'weight_tensor_sum',
                                  'activation'])
def test_fused_matches_torch_float32(plan, case):
    """Outputs and x-gradients bit-equal, scale gradients equal up to the
    order of summation, on data full of ties."""
    gen = torch.Generator().manual_seed(hash((plan, case)) % 2**31)
    if case == 'activation':
        shape, scale, dims = (3, 5, 7, 6), torch.tensor([0.03]), None
    else:
        shape, dims = (6, 4, 3, 3), (1, 2, 3)
        scale = torch.rand(6, 1, 1, 1, generator=gen) * 0.05 + 0.01
        scale = torch.exp2(torch.round(torch.log2(scale)))  # exact ties
        if case == 'weight_tensor_sum':
            dims = None
    x = tie_tensor(gen, shape, scale if case == 'activation' else scale,
                   torch.float32)
    grad = torch.randn(shape, generator=gen)
    ref = run('torch', x, scale, plan, dims, grad)
    fused = run('fused', x, scale, plan, dims, grad)
    assert fused_kernels._kernels.get('cpu')  # built, and used
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1], ref[1])
    assert fused[2].shape == ref[2].shape == scale.shape
    # float32 sums in another order: within the classic bound
    # n * eps * sum|terms|, with |term| <= |grad| * 130 * 0.25 (grad_scale)
    bound = x.numel() * 2**-24 * float(grad.abs().sum()) * 130 * 0.25
    torch.testing.assert_close(fused[2], ref[2], rtol=0, atol=bound)


def bits_reference(x, s, h_range, targets, mode, residual, grads):
    """Float64 outputs and per-row scale gradient of ``fake_quant_bits``
    for ``mode`` 'half_even', 'half_up' or 'floor', the x gradient
    (``grads`` summed in their dtype, in target order), and per row the
    sum of the scale gradient's absolute terms (for a rounding bound)."""
    def round_(t):
        return {'half_even': torch.round, 'floor': torch.floor,
                'half_up': lambda u: torch.floor(u + 0.5)}[mode](t)
    x64, s64 = x.double(), s.double()
    q_h = torch.clamp(torch.round(x64 / s64), *h_range)
    outs, grad_x, grad_s, size = [], 0, 0, 0
    for (shift, (lo, hi), g), grad in zip(targets, grads):
        q = torch.clamp(round_(q_h / 2**shift), lo, hi)
        outs.append(q * (s64 * 2**shift))
        v = x64 / (s64 * 2**shift)
        inside = (v >= lo) & (v <= hi)
        if residual == 'first_rounding':
            q = torch.where(inside, torch.clamp(round_(v), lo, hi), q)
        grad_x = grad_x + torch.where(inside, grad, 0.0)  # float32 sums
        local = torch.where(inside, q - v, q) * grad.double() * g
        grad_s = grad_s + local.sum(dim=1, keepdim=True)
        size = size + local.abs().sum(dim=1, keepdim=True)
    return outs, grad_x, grad_s, size


def run_bits(impl, x, s, targets, mode, residual, grads):
    """``fake_quant_bits`` forward and backward on ``impl``: outputs and the
    gradients of x and s."""
    rounding, variant = ('half_even', 'floor') if mode == 'floor' \
        else (mode, 'double_rounding')
    xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
    with fake_quant_impl(impl):
        outs = functional.fake_quant_bits(
            xg, sg, (-128, 127), targets, rounding, variant,
            reduce_dims=(1, ) if s.numel() > 1 else None, residual=residual)
        sum((o * g).sum() for o, g in zip(outs, grads)).backward()
    return [o.detach() for o in outs], xg.grad, sg.grad


TARGETS = [(0, (-128, 127), 0.5), (2, (-32, 31), 0.25), (4, (-8, 7), 2.0),
           (6, (-2, 1), 1.0)]


@pytest.mark.parametrize('rows', [1, 3])
@pytest.mark.parametrize('mode', ['half_even', 'half_up', 'floor'])
@pytest.mark.parametrize('residual', ['first_rounding', 'double_rounded'])
def test_kernels_across_blocks_and_targets(rows, mode, residual):
    """Rows longer than a kernel's block (1024) and four targets from one
    first rounding. On fresh ties (power-of-two scales): outputs and x
    gradient equal the reference (float64 integers), the scale gradient
    is the reference within float32 rounding of its terms. With scales of
    any value (inexact divisions): the same numbers as the torch path."""
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr(('blocks', rows, mode, residual)).encode()))
    cols = 2600 + int(torch.randint(0, 500, (1, ), generator=gen))
    s = torch.exp2(torch.randint(-7, -4, (rows, 1), generator=gen).float())
    x = tie_tensor(gen, (rows, cols), s, torch.float32)
    grads = [torch.randn(rows, cols, generator=gen) for _ in TARGETS]
    outs, grad_x, grad_s = run_bits('fused', x, s, TARGETS, mode, residual,
                                    grads)
    assert fused_kernels._kernels.get('cpu')
    ref_outs, ref_gx, ref_gs, size = bits_reference(
        x, s, (-128, 127), TARGETS, mode, residual, grads)
    for out, ref in zip(outs, ref_outs):
        assert torch.equal(out, ref.float())
    assert torch.equal(grad_x, ref_gx)
    # each term rounded a few times in float32, the sums in double
    assert ((grad_s.double() - ref_gs).abs() <= size * 2**-21).all()
    s = torch.rand(rows, 1, generator=gen) * 0.05 + 0.01
    x = torch.randn(rows, cols, generator=gen) * s * 60
    fused = run_bits('fused', x, s, TARGETS, mode, residual, grads)
    plain = run_bits('torch', x, s, TARGETS, mode, residual, grads)
    for got, want in zip(fused[0], plain[0]):
        assert torch.equal(got, want)
    assert torch.equal(fused[1], plain[1])
    # the torch path sums each target's float32 terms in float32
    size = bits_reference(x, s, (-128, 127), TARGETS, mode, residual,
                          grads)[3]
    bound = size * (cols * 2**-23 + 2**-21)
    assert ((fused[2].double() - plain[2].double()).abs() <= bound).all()


def test_kernels_take_any_layout_and_refuse_other_devices():
    """A channels-last input, a per-row scale that is a strided view and a
    transposed output gradient give the torch path's outputs and gradients
    (the C++ entry points make them contiguous); a scale on another device
    than x gets torch's device error (the kernels would read its memory as
    the CPU's)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, 10, 10, generator=gen).to(
        memory_format=torch.channels_last)
    scales = torch.rand(4, 2, generator=gen) * 0.1 + 0.01
    grad = torch.randn(4, 6, 10, 10, generator=gen).transpose(2, 3)
    results = []
    for impl in ('fused', 'torch'):
        x_, base = x.clone().requires_grad_(), scales.clone().requires_grad_()
        scale = base[:, :1, None, None]  # a strided view, in the graph
        assert not (x_.is_contiguous() or scale.is_contiguous() or
                    grad.is_contiguous())
        with fake_quant_impl(impl):
            out = fake_quant(x_, scale, (-128, 127), 4, (-8, 7),
                             reduce_dims=(1, 2, 3))
            out.backward(grad)
        results.append((out.detach(), x_.grad, base.grad))
    (out, gx, gs), (out_t, gx_t, gs_t) = results
    assert torch.equal(out, out_t) and torch.equal(gx, gx_t)
    assert torch.allclose(gs, gs_t, rtol=1e-5) and gs[:, 1].eq(0).all()
    assert fused_kernels._kernels.get('cpu')
    # outputs are fresh tensors (an in-place op after them is allowed),
    # and a scale wider than x's compute type is not narrowed in secret
    with fake_quant_impl('fused'):
        fake_quant(x.requires_grad_(), scales[:, :1], (-8, 7), 0,
                   (-8, 7), reduce_dims=(1, 2, 3)).relu_().sum().backward()
    with pytest.raises(RuntimeError, match='wider than'):
        fused_kernels._kernels['cpu'].forward(
            x, scales.double()[:, :1], functional._QuantSpec(
                (-8, 7), [(0, (-8, 7), 1.0)], 'half_even',
                'double_rounding', 'first_rounding'))
    with fake_quant_impl('fused'), pytest.raises(RuntimeError,
                                                 match='device'):
        fake_quant(x, torch.full((1, ), 0.1, device='meta'), (-8, 7), 0,
                   (-8, 7))


@pytest.mark.parametrize('impl', ['torch', 'fused'])
def test_bfloat16_activations(impl):
    """bf16 inputs (autocast) keep their dtype; the division and rounding
    run in the scale's float32, so both paths give the same numbers."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 5, 5, generator=gen).to(torch.bfloat16)
    scale = torch.tensor([0.021])
    grad = torch.randn(x.shape, generator=gen).to(torch.bfloat16)
    out, gx, gs = run(impl, x, scale, PLANS[1], None, grad)
    assert out.dtype == gx.dtype == torch.bfloat16 and gs.dtype == torch.float32
    q = torch.clamp(torch.round(torch.clamp(torch.round(
        x.float() / scale), -128, 127) / 16), -8, 7)
    assert torch.equal(out, (q * scale * 16).to(torch.bfloat16))


class _Failing:
    """Kernels whose every use fails: raises ``error`` when built."""
    error = AssertionError('fused kernel called on the torch path')

    def __init__(self):
        raise self.error


def test_torch_path_never_calls_the_kernels(monkeypatch):
    monkeypatch.setitem(fused_kernels.KERNELS, 'cpu', _Failing)
    monkeypatch.setattr(fused_kernels, '_kernels', {})
    x = torch.randn(4, 3, requires_grad=True)
    with fake_quant_impl('torch'):
        fake_quant(x, torch.ones(1) * 0.1, (-8, 7), 0, (-8, 7)).sum().backward()


def test_bad_impl_names_the_value():
    with pytest.raises(ValueError, match='tuned'):
        functional.set_fake_quant_impl('tuned')


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='the Inductor kernels serve CUDA (the CPU has C++)')
def test_one_kernel_per_dtype_and_scale_layout(make_tiny_cnn):
    """Bits, layers and roundings share the compiled kernels: after one
    warm-up pass, a full pass over every bit recompiles nothing."""
    model = mmdrq.quantize_model(make_tiny_cnn(), bits=(8, 6, 4, 2)).cuda()
    x = torch.randn(2, 3, 8, 8, device='cuda')

    def every_bit():
        for bit in (8, 6, 4, 2):
            mmdrq.set_bits(model, bit)
            model(x).sum().backward()
    with fake_quant_impl('fused'):
        every_bit()
        with torch._dynamo.config.patch(error_on_recompile=True):
            every_bit()
            with torch.no_grad():
                model(x * 3)


def test_compiled_model_matches_eager(make_tiny_cnn):
    """torch.compile of a quantized model (Inductor fuses the traced
    quantizer math): same outputs and gradients as eager, at every bit."""
    bits = (8, 4)
    eager = mmdrq.quantize_model(make_tiny_cnn(seed=3), bits=bits).train()
    compiled = mmdrq.quantize_model(make_tiny_cnn(seed=3), bits=bits).train()
    x = torch.randn(4, 3, 8, 8)
    for bit in bits:  # lazy init happens eagerly, as in MultiPrecisionQAT
        for model in (eager, compiled):
            mmdrq.set_bits(model, bit)
            model(x)
    compiled.load_state_dict(eager.state_dict())
    assert mmdrq.quantization.quantizers_ready(compiled)
    run_compiled = torch.compile(compiled, options=dict(CPU_COMPILE_OPTIONS))
    for bit in bits:
        outs, grads = [], []
        for model, run_model in ((eager, eager), (compiled, run_compiled)):
            mmdrq.set_bits(model, bit)
            model.zero_grad()
            out = run_model(x)
            out.square().sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad for n, p in model.named_parameters()
                          if p.grad is not None})
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name],
                                       rtol=1e-3, atol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('plan', PLANS)
def test_cuda_fused_matches_cpu_reference(plan):
    """On CUDA the fused kernels are Inductor's Triton: same numbers as the
    CPU torch path, for weights and for bf16 activations."""
    gen = torch.Generator().manual_seed(11)
    scale = torch.exp2(torch.randint(-7, -3, (6, 1, 1, 1),
                                     generator=gen).float())
    x = tie_tensor(gen, (6, 4, 3, 3), scale, torch.float32)
    grad = torch.randn(x.shape, generator=gen)
    ref = run('torch', x, scale, plan, (1, 2, 3), grad)
    got = run('fused', x.cuda(), scale.cuda(), plan, (1, 2, 3), grad.cuda())
    assert torch.equal(got[0].cpu(), ref[0])
    assert torch.equal(got[1].cpu(), ref[1])
    torch.testing.assert_close(got[2].cpu(), ref[2], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('mode', ['fixed', 'adaptive', 'summed'])
def test_cuda_training_step_has_no_host_sync(make_tiny_cnn, mode):
    """After the first steps (lazy scale init reads the device once), an
    iteration over every bit never waits for the GPU: per-bit steps with
    ALRS fixed or adaptive, and one step on a summed loss with the weights
    rounded once for all bits. (A wait on the ALRS norm's CUDA event,
    only taken if the GPU ran a step behind, is not a check this mode
    catches.)"""
    from mmengine.optim import build_optim_wrapper

    from mmdrq.quantization import shared_rounding
    model = mmdrq.quantize_model(make_tiny_cnn(), bits=(8, 4)).cuda().train()
    wrapper = build_optim_wrapper(model, dict(
        type='mmdrq.ALRSOptimWrapper',
        constructor='mmdrq.ALRSOptimWrapperConstructor',
        mode='fixed' if mode == 'summed' else mode,
        optimizer=dict(type='SGD', lr=0.01)))
    x = torch.randn(4, 3, 8, 8, device='cuda')

    def loss_at(bit):
        mmdrq.set_bits(model, bit)
        return model(x).square().mean()

    def iteration():
        if mode == 'summed':
            with shared_rounding(model):
                total = loss_at(8) + loss_at(4)
            wrapper.update_params(total)
            return
        for bit in (8, 4):
            wrapper.set_bit(bit)
            wrapper.update_params(loss_at(bit))
    for _ in range(2):  # init, then every adaptive norm queued once
        iteration()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        iteration()
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_auto_falls_back_to_torch_when_kernels_cannot_build(monkeypatch):
    """No compiler: ``auto`` warns once, gives the torch path's numbers and
    stays on it; ``fused`` raises instead."""
    class Broken(_Failing):
        error = RuntimeError('no C++ compiler')
    monkeypatch.setitem(fused_kernels.KERNELS, 'cpu', Broken)
    monkeypatch.setattr(fused_kernels, '_kernels', {})
    x = torch.randn(3, 8)
    scale = torch.full((1, ), 0.05)
    with fake_quant_impl('fused'), pytest.raises(RuntimeError,
                                                 match='compiler'):
        fake_quant(x, scale, (-8, 7), 0, (-8, 7))
    with fake_quant_impl('auto'):
        with pytest.warns(UserWarning, match='no C\\+\\+ compiler'):
            out = fake_quant(x, scale, (-8, 7), 0, (-8, 7))
        assert fused_kernels.failed('cpu')
        again = fake_quant(x, scale, (-8, 7), 0, (-8, 7))  # no second try
    with fake_quant_impl('torch'):
        ref = fake_quant(x, scale, (-8, 7), 0, (-8, 7))
    assert torch.equal(out, ref) and torch.equal(again, ref)


HALF_DTYPES = [torch.bfloat16, torch.float16]


def half_case(gen, rows, dtype):
    """``rows`` scales in ``dtype``: arbitrary values on even rows and
    powers of two (exact ties) on odd rows."""
    s = (torch.rand(rows, generator=gen, dtype=torch.float64) * 0.05 + 0.01)
    s[1::2] = torch.exp2(torch.round(torch.log2(s[1::2])))
    return s.to(dtype)


def half_inputs(gen, s, shape, lo, hi, dtype):
    """``v * s`` in ``dtype`` with v spanning past [lo, hi], some v = k + 0.5
    and v = hi + 1 exactly (one past the top: inside under a 16-bit limit
    that rounds up)."""
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * hi * 0.8
    flat = v.view(shape[0], -1)
    flat[:, :6] = torch.randint(-60, 60, (shape[0], 6), generator=gen) + 0.5
    flat[:, 6] = hi + 1.0
    flat[:, 7] = lo
    s64 = s.double().view(-1, *[1] * (len(shape) - 1)) if s.numel() > 1 \
        else s.double()
    return (v * s64).to(dtype)


def half_run(quant, x, bit, grad, impl):
    quant.scale.grad = None
    x = x.detach().clone().requires_grad_()
    with fake_quant_impl(impl):
        out = quant(x, bit)
        out.backward(grad)
    return out.detach(), x.grad, quant.scale.grad.clone()


def half_reference(x, s, h_range, shift, l_range, grad, g):
    """Float64: output, x grad and un-reduced scale grad (times g, with the
    default residual round(v) - v) of the Double Rounding of bf16/fp16
    ``x`` (integers by float64 ops: the float32 quotient of two 16-bit
    floats rounds the same way)."""
    x64, s64, grad64 = x.double(), s.double(), grad.double()
    q_h = torch.clamp(torch.round(x64 / s64), *h_range)
    q_l = torch.clamp(torch.round(q_h / 2**shift), *l_range)
    v = x64 / (s64 * 2**shift)
    inside = (v >= l_range[0]) & (v <= l_range[1])
    local = torch.where(inside, torch.round(v) - v, q_l)
    out = (q_l * s64 * 2**shift).to(x.dtype)
    return out, torch.where(inside, grad, 0).to(x.dtype), grad64 * local * g


def check_half(got, ref, scale_ref, dtype):
    """Output and x grad bit-equal; scale grad within one ``dtype`` step."""
    assert got[0].dtype == got[1].dtype == got[2].dtype == dtype
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2].double(), scale_ref.to(dtype).double(),
                               rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
@pytest.mark.parametrize('bits', [(8, 6, 4, 2), (12, 8, 4)])
def test_half_precision_weights_match_float64(dtype, bits):
    """A bf16/fp16 weight quantizer (weight and scale in that dtype) on
    both paths: x / s divided and rounded in float32, so every bit's
    output and x grad equal the float64 reference and each other, and the
    per-channel scale grad is the reference within one step of the
    dtype."""
    from mmdrq.quantization import DoubleRoundingQuantizer
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr(('half_w', dtype, bits)).encode()))
    h = bits[0]
    h_range = (-2**(h - 1), 2**(h - 1) - 1)
    s = half_case(gen, 6, dtype)
    x = half_inputs(gen, s, (6, 4, 3, 3), *h_range, dtype)
    quant = DoubleRoundingQuantizer(bits, num_channels=6).to(dtype)
    with torch.no_grad():
        quant.scale.copy_(s.view(1, 6))
        quant.initialized.fill_(True)
    for l in bits:
        l_range = (-2**(l - 1), 2**(l - 1) - 1)
        grad = torch.randn(x.shape, generator=gen).to(dtype)
        ref = half_reference(x, s.view(-1, 1, 1, 1), h_range, h - l,
                             l_range, grad, (36 * l_range[1])**-0.5)
        scale_ref = ref[2].sum(dim=(1, 2, 3)).view(1, 6)
        paths = [half_run(quant, x, l, grad, impl)
                 for impl in ('torch', 'fused')]
        for got in paths:
            check_half(got, ref, scale_ref, dtype)
        check_half(paths[1], paths[0][:2], paths[0][2], dtype)


@pytest.mark.parametrize('dtype', HALF_DTYPES)
@pytest.mark.parametrize('signed', [True, False])
def test_half_precision_activations_match_float64(dtype, signed):
    """The same for a bf16/fp16 activation quantizer (input and scales in
    that dtype), signed and unsigned, at every bit."""
    from mmdrq.quantization import ActQuantizer
    bits = (8, 4)
    gen = torch.Generator().manual_seed(
        zlib.crc32(repr(('half_a', dtype, signed)).encode()))
    quant = ActQuantizer(bits, signed=signed).to(dtype)
    scales = half_case(gen, len(bits), dtype)
    with torch.no_grad():
        quant.scale.copy_(scales)
        quant.initialized.fill_(True)
    for i, b in enumerate(bits):
        lo, hi = (-2**(b - 1), 2**(b - 1) - 1) if signed else (0, 2**b - 1)
        x = half_inputs(gen, scales[i:i + 1], (4, 8, 5, 5), lo, hi, dtype)
        grad = torch.randn(x.shape, generator=gen).to(dtype)
        ref = half_reference(x, scales[i], (lo, hi), 0, (lo, hi), grad,
                             (200 * hi)**-0.5)
        paths = [half_run(quant, x, b, grad, impl)
                 for impl in ('torch', 'fused')]
        for got in paths:
            check_half((got[0], got[1], got[2][i:i + 1]), ref,
                       ref[2].sum().view(1), dtype)
            assert (got[2][[j for j in range(len(bits)) if j != i]] == 0).all()
        check_half(paths[1], paths[0][:2], paths[0][2], dtype)
