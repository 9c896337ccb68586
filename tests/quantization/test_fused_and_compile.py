"""The fused fake-quant kernels and whole-model torch.compile.

The float64 references of test_double_rounding/test_act_quantizer/test_layers
already run on both paths (``fake_quant_path``); this checks what those do
not: that the fused kernels really run, agree with the torch path in float32
and bfloat16, are built once for every bit and layer, and that a compiled
model trains like the eager one.
"""
import pytest
import torch

import mmdrq
from mmdrq.quantization import functional
from mmdrq.models.multi_precision import CPU_COMPILE_OPTIONS
from mmdrq.quantization.functional import fake_quant, fake_quant_impl

PLANS = [  # (h_range, shift, l_range, rounding, variant)
    ((-128, 127), 0, (-128, 127), 'half_even', 'double_rounding'),
    ((-128, 127), 4, (-8, 7), 'half_even', 'double_rounding'),
    ((-128, 127), 6, (-2, 1), 'half_up', 'double_rounding'),
    ((-8, 7), 1, (-4, 3), 'half_even', 'floor'),
    ((0, 255), 0, (0, 255), 'half_even', 'double_rounding'),
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
    assert functional._fused_state['ok'] is True
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1], ref[1])
    assert fused[2].shape == ref[2].shape == scale.shape
    # float32 sums in another order: within the classic bound
    # n * eps * sum|terms|, with |term| <= |grad| * 130 * 0.25 (grad_scale)
    bound = x.numel() * 2**-24 * float(grad.abs().sum()) * 130 * 0.25
    torch.testing.assert_close(fused[2], ref[2], rtol=0, atol=bound)


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


def test_torch_path_never_calls_the_kernels(monkeypatch):
    def fail(*args):
        raise AssertionError('fused kernel called on the torch path')
    monkeypatch.setitem(functional._fused_state, 'fns', (fail, fail))
    x = torch.randn(4, 3, requires_grad=True)
    with fake_quant_impl('torch'):
        fake_quant(x, torch.ones(1) * 0.1, (-8, 7), 0, (-8, 7)).sum().backward()


def test_bad_impl_names_the_value():
    with pytest.raises(ValueError, match='tuned'):
        functional.set_fake_quant_impl('tuned')


def test_one_kernel_per_dtype_and_scale_layout(make_tiny_cnn):
    """Bits, layers and roundings share the compiled kernels: after one
    warm-up pass, a full pass over every bit recompiles nothing."""
    model = mmdrq.quantize_model(make_tiny_cnn(), bits=(8, 6, 4, 2))
    x = torch.randn(2, 3, 8, 8)

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
    def broken(*args):
        raise RuntimeError('no C++ compiler')
    monkeypatch.setitem(functional._fused_state, 'fns', (broken, broken))
    monkeypatch.setitem(functional._fused_state, 'ok', None)
    x = torch.randn(3, 8)
    scale = torch.full((1, ), 0.05)
    with fake_quant_impl('fused'), pytest.raises(RuntimeError,
                                                 match='compiler'):
        fake_quant(x, scale, (-8, 7), 0, (-8, 7))
    with fake_quant_impl('auto'):
        with pytest.warns(UserWarning, match='no C\\+\\+ compiler'):
            out = fake_quant(x, scale, (-8, 7), 0, (-8, 7))
        assert functional._fused_state['ok'] is False
        again = fake_quant(x, scale, (-8, 7), 0, (-8, 7))  # no second try
    with fake_quant_impl('torch'):
        ref = fake_quant(x, scale, (-8, 7), 0, (-8, 7))
    assert torch.equal(out, ref) and torch.equal(again, ref)
