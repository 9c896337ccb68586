"""The multi-precision QAT wrapper's training step and checkpoint loading."""
import contextlib

import pytest
import torch
from mmengine.optim import OptimWrapper, build_optim_wrapper

import mmdrq
from conftest import CountingWrapper, classifier_batch
from mmdrq.models import MultiPrecisionQAT


@pytest.mark.parametrize('loss_mode, steps', [('per_bit', [8, 6, 4, 2]),
                                              ('sum', [8])])
def test_train_step_walks_bits(small_classifier, loss_mode, steps):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 6, 4, 2]),
                              loss_mode=loss_mode)
    wrapper = CountingWrapper(torch.optim.SGD(model.parameters(), 0.01),
                              model)
    log_vars = model.train_step(classifier_batch(), wrapper)
    assert wrapper.step_bits == steps  # sum: one step, after the loop
    for bit in (8, 6, 4, 2):
        assert torch.isfinite(log_vars[f'loss@w{bit}a{bit}'])
    expected = sum(log_vars[f'loss@w{b}a{b}'] for b in (8, 6, 4, 2))
    torch.testing.assert_close(log_vars['loss'], expected)
    assert set(mmdrq.get_bits(model).values()) == {8}
    assert model.uncalled_layers == []  # every converted layer ran


class GradRecorder(OptimWrapper):
    """OptimWrapper keeping a copy of every gradient at its (one) step."""

    def step(self, **kwargs):
        self.grads = [None if p.grad is None else p.grad.clone()
                      for g in self.optimizer.param_groups
                      for p in g['params']]
        super().step(**kwargs)


def test_summed_loss_rounds_each_weight_once(small_classifier, monkeypatch):
    """``loss_mode='sum'``: each weight quantizer computes every bit in one
    call per step, with the gradients of a run that quantizes per bit."""
    import copy

    from mmdrq.models import step_plugins
    from mmdrq.quantization import DoubleRoundingQuantizer
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 6, 4, 2]),
                              loss_mode='sum')
    reference = copy.deepcopy(model)
    calls = []
    original = DoubleRoundingQuantizer._fake_quant

    def spy(self, weight, bits):
        calls.append((id(self), tuple(bits)))
        return original(self, weight, bits)
    monkeypatch.setattr(DoubleRoundingQuantizer, '_fake_quant', spy)
    wrapper = GradRecorder(torch.optim.SGD(model.parameters(), 0.01))
    model.train_step(classifier_batch(), wrapper)
    quantizers = [m for m in model.modules()
                  if isinstance(m, DoubleRoundingQuantizer)]
    assert sorted(calls) == sorted((id(q), (8, 6, 4, 2)) for q in quantizers)
    assert all(q._shared is None for q in quantizers)

    monkeypatch.setattr(step_plugins, 'shared_rounding',
                        lambda model: contextlib.nullcontext())
    calls.clear()
    expected = GradRecorder(torch.optim.SGD(reference.parameters(), 0.01))
    reference.train_step(classifier_batch(), expected)
    # per bit and layer, again in the backward (recomputed, not kept)
    assert len(calls) == 2 * 4 * len(quantizers)
    assert sum(g is not None for g in wrapper.grads) > len(quantizers)
    for got, want in zip(wrapper.grads, expected.grads):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def tiny_beit():
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='BEiTViT', img_size=16, patch_size=8,
                      arch=dict(embed_dims=16, num_layers=1, num_heads=2,
                                feedforward_channels=32),
                      use_abs_pos_emb=False, use_rel_pos_bias=True,
                      out_type='avg_featmap'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=16)))


def test_weight_read_by_its_owner_is_quantized(mmengine_caplog):
    """mmpretrain's BEiT reads ``qkv.weight`` with F.linear: the conversion
    finds the read, so the step uses (and initialises) its quantized
    weight, and no layer is reported as never called."""
    model = MultiPrecisionQAT(tiny_beit(), dict(bits=[8, 4]))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), 0.01))
    model.train_step(classifier_batch(size=16), wrapper)
    assert model.uncalled_layers == []
    qkv = model.architecture.backbone.layers[0].attn.qkv
    assert bool(qkv.weight_quantizer.initialized.all())


def test_layers_never_called_are_reported(mmengine_caplog, monkeypatch):
    """A weight read the conversion cannot see (here: BEiT's, with the code
    scan switched off) bypasses the converted qkv layer's forward, so the
    first training step names it, and compile=True does not wait for its
    scales."""
    from mmdrq.models.multi_precision import _COMPILED
    monkeypatch.setattr('mmdrq.quantization.convert.weight_reads',
                        lambda owner: [])
    model = MultiPrecisionQAT(tiny_beit(), dict(bits=[8, 4]), compile=True)
    assert model.uncalled_layers is None
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), 0.01))
    model.train_step(classifier_batch(size=16), wrapper)
    assert model.uncalled_layers == ['backbone.layers.0.attn.qkv']
    assert 'backbone.layers.0.attn.qkv' in mmengine_caplog.text
    assert 'quantizer.skip' in mmengine_caplog.text
    assert not model.architecture.backbone.layers[0].attn.qkv \
        .weight_quantizer.ready
    assert model._runner() is _COMPILED[model]


def test_per_bit_steps_use_alrs_rates(small_classifier):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    wrapper = build_optim_wrapper(model, dict(
        type='mmdrq.ALRSOptimWrapper',
        constructor='mmdrq.ALRSOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.1)))
    seen = []
    original = wrapper.step

    def spy(**kwargs):
        seen.append((wrapper.bit, wrapper.eta()))
        original(**kwargs)
    wrapper.step = spy
    model.train_step(classifier_batch(), wrapper)
    assert seen == [(8, 1.0), (4, 0.01)]


def per_bit_gradients(model, data, bits):
    """{bit: gradients of that bit's loss alone} on a copy of ``model``:
    the reference of the summed-loss steps."""
    import copy
    reference = copy.deepcopy(model)
    params = list(reference.parameters())
    data = reference.data_preprocessor(data, True)
    grads = {}
    for bit in bits:
        mmdrq.set_bits(reference.architecture, bit)
        loss, _ = reference.parse_losses(reference(**data, mode='loss'))
        grads[bit] = torch.autograd.grad(loss, params, allow_unused=True)
    return grads


@pytest.mark.parametrize('optimizer', ['SGD', 'Adam'])
@pytest.mark.parametrize('mode', ['fixed', 'adaptive'])
def test_summed_loss_weights_each_bits_scale_gradient_by_eta(
        small_classifier, optimizer, mode):
    """``loss_mode='sum'`` with ALRS: the one step sees sum_b eta_b g_b on
    the scales (SGD: the per-bit rate eta_b; Adam normalises that sum) and
    sum_b g_b on the other params. Adaptive: the fixed eta_b until each bit
    has a norm, then n_8 / n_2 of the previous iteration (momentum 0).
    Before, eta stayed 1 in this mode."""
    bits = (8, 2)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=list(bits)),
                              loss_mode='sum')
    # Adam's steps are about lr whatever the gradient: 0.01 would jump the
    # scales (about 0.003 at 8 bits) out of the weights' range
    lr = 0.01 if optimizer == 'SGD' else 1e-4
    wrapper = build_optim_wrapper(model, dict(
        type='mmdrq.ALRSOptimWrapper',
        constructor='mmdrq.ALRSOptimWrapperConstructor', mode=mode,
        momentum=0.0, optimizer=dict(type=optimizer, lr=lr)))
    alrs = {id(p) for g in wrapper.optimizer.param_groups if g.get('alrs')
            for p in g['params']}
    params = list(model.parameters())
    seen = []
    wrapper.optimizer.register_step_pre_hook(lambda *_: seen.append(
        [None if p.grad is None else p.grad.clone() for p in params]))
    eta = {8: 1.0, 2: 0.001}  # fixed: 10^(-d/2), d = 6
    for iteration in range(2):
        grads = per_bit_gradients(model, classifier_batch(), bits)
        before = [p.detach().clone() for p in params]
        model.train_step(classifier_batch(), wrapper)
        assert len(seen) == iteration + 1  # one step per iteration
        checked = 0
        for i, p in enumerate(params):
            per_bit = [grads[b][i] for b in bits if grads[b][i] is not None]
            if not per_bit:
                assert seen[-1][i] is None
                continue
            weights = [eta[b] for b in bits if grads[b][i] is not None] \
                if id(p) in alrs else [1.0] * len(per_bit)
            expected = sum(w * g for w, g in zip(weights, per_bit))
            torch.testing.assert_close(seen[-1][i], expected, rtol=1e-4,
                                       atol=1e-7)
            # the update, lr times that gradient (to the float32 resolution
            # of the parameter), once the first forwards set the scales
            if optimizer == 'SGD' and iteration == 1:
                torch.testing.assert_close(
                    before[i] - p.detach(), lr * expected, rtol=1e-3,
                    atol=1e-6 * float(before[i].abs().max()))
            if id(p) in alrs and len(per_bit) == 2:
                checked += 1
                # eta 1 would be far off: the test can fail
                assert not torch.allclose(sum(per_bit), expected, rtol=0.1)
        assert checked > 10  # the weight scales, used at both bits
        if mode == 'adaptive':
            norms = {b: float(torch.linalg.vector_norm(torch.stack([
                torch.linalg.vector_norm(grads[b][i])
                for i, p in enumerate(params)
                if id(p) in alrs and grads[b][i] is not None])))
                for b in bits}
            eta[2] = min(1.0, max(1e-4, norms[8] / norms[2]))
            assert eta[2] != pytest.approx(0.001, rel=0.1)


def test_summed_loss_alrs_counts_one_backward_per_iteration(
        small_classifier):
    """Gradient accumulation over 2 iterations: one step, after the
    second (the per-bit backwards count once)."""
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4, 2]),
                              loss_mode='sum')
    wrapper = build_optim_wrapper(model, dict(
        type='mmdrq.ALRSOptimWrapper', accumulative_counts=2,
        constructor='mmdrq.ALRSOptimWrapperConstructor',
        optimizer=dict(type='SGD', lr=0.01)))
    wrapper.initialize_count_status(model, 0, 4)
    steps = []
    wrapper.optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    for count in (1, 2):
        model.train_step(classifier_batch(), wrapper)
        assert wrapper._inner_count == count
    assert steps == [1]


def test_summed_loss_alrs_under_ddp_is_an_error(small_classifier):
    """The per-bit backwards of the summed loss with ALRS cannot run under
    DDP (one gradient reduction per forward and backward): a clear error
    before any forward, instead of DDP's 'mark a variable ready only
    once'. One gloo rank."""
    import socket

    import torch.distributed as dist

    from mmdrq.models.multi_precision import MultiPrecisionQATDDP
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=0, world_size=1)
    try:
        model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                                  loss_mode='sum')
        wrapper = build_optim_wrapper(model, dict(
            type='mmdrq.ALRSOptimWrapper', mode='adaptive',
            constructor='mmdrq.ALRSOptimWrapperConstructor',
            optimizer=dict(type='SGD', lr=0.01)))
        with pytest.raises(ValueError, match="loss_mode='sum' with ALRS "
                           r"\(optim_wrapper.mode='adaptive'\).*DDP"):
            MultiPrecisionQATDDP(model).train_step(classifier_batch(), wrapper)
        assert not model.architecture.backbone.layer1[0].conv1 \
            .weight_quantizer.initialized.any()  # before any forward
    finally:
        dist.destroy_process_group()


def test_bit_list_mismatch_is_an_error(small_classifier):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 6, 4, 2]))
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), 0.01))
    wrapper.bits = (8, 4)
    with pytest.raises(ValueError, match=r'\[8, 4\].*\[8, 6, 4, 2\]'):
        model.train_step(classifier_batch(), wrapper)


def test_bad_loss_mode(small_classifier):
    with pytest.raises(ValueError, match="loss_mode.*'mean'"):
        MultiPrecisionQAT(small_classifier(), loss_mode='mean')
    checkpointed = small_classifier()
    checkpointed.backbone.with_cp = True
    with pytest.raises(ValueError, match="with_cp=True in backbone"):
        MultiPrecisionQAT(checkpointed, loss_mode='sum')
    MultiPrecisionQAT(checkpointed, loss_mode='per_bit')  # bit stays put


@pytest.mark.parametrize('value', [
    (1, 3, 16, 16), dict(shape=(1, 3, 16, 16)),
    dict(input_shape=(1, 3, 16, 16), extra=1)])
def test_bad_transitional_bn_names_the_key(small_classifier, value):
    with pytest.raises(ValueError, match=r'transitional_bn must be '
                       r'dict\(input_shape=\(1, 3, H, W\)\), got'):
        MultiPrecisionQAT(small_classifier(), transitional_bn=value)


def test_fp32_checkpoint_of_bare_model_loads(small_classifier):
    torch.manual_seed(3)
    fp32 = small_classifier()
    state = {k: v.clone() for k, v in fp32.state_dict().items()}
    torch.manual_seed(4)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all('quantizer' in k or k == '_extra_state'
               for k in result.missing_keys)
    arch = model.architecture
    torch.testing.assert_close(arch.backbone.conv1.weight,
                               state['backbone.conv1.weight'])
    bn = arch.backbone.layer1[0].bn1
    for bit in (8, 4):
        torch.testing.assert_close(bn.bns[str(bit)].running_var,
                                   state['backbone.layer1.0.bn1.running_var'])
    # the wrapper's own checkpoints round-trip as usual
    again = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    again.load_state_dict(model.state_dict(), strict=True)


def test_state_dict_carries_bits_and_options(small_classifier):
    """However loosely a state dict is loaded (MMEngine's load_from is
    non-strict), one of another bit list or quantizer options is refused
    before any weight moves: its scales would serve other bits."""
    from mmengine.runner.checkpoint import load_state_dict

    from mmdrq.quantization.meta import decode_meta
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    state = model.state_dict()
    assert decode_meta(state['_extra_state']) == dict(
        bits=[8, 4], options=dict(variant='double_rounding',
                                  rounding='half_even', per_channel=True))
    other = MultiPrecisionQAT(small_classifier(), dict(bits=[4, 2]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    message = r'was saved with bits=\[8, 4\], the model has bits=\[4, 2\]'
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state, strict=False)
    with pytest.raises(ValueError, match=message):
        load_state_dict(other, state)
    for key, value in before.items():
        assert torch.equal(other.state_dict()[key], value), key
    floor = MultiPrecisionQAT(small_classifier(), dict(
        bits=[8, 4], weight_quantizer=dict(type='DoubleRoundingQuantizer',
                                           variant='floor')))
    with pytest.raises(ValueError, match="'variant': 'floor'"):
        floor.load_state_dict(state, strict=False)


def test_takes_top_level_data_preprocessor():
    from mmpretrain.models.utils import ClsDataPreprocessor
    arch = dict(type='ImageClassifier',
                backbone=dict(type='ResNet_CIFAR', depth=18),
                neck=dict(type='GlobalAveragePooling'),
                head=dict(type='LinearClsHead', num_classes=10,
                          in_channels=512))
    from mmengine.registry import init_default_scope
    init_default_scope('mmpretrain')
    model = MultiPrecisionQAT(
        arch, dict(bits=[4, 2]),
        data_preprocessor=dict(type='ClsDataPreprocessor', mean=[1.0] * 3,
                               std=[2.0] * 3))
    assert isinstance(model.data_preprocessor, ClsDataPreprocessor)
    assert model.data_preprocessor is model.architecture.data_preprocessor
    assert model.data_preprocessor.mean.flatten().tolist() == [1.0] * 3


def test_compile_option_trains_like_eager(small_classifier):
    """compile=True: eager until every scale is initialised, then the
    compiled architecture, whose losses follow the eager model's.

    Not bit-exact: Inductor's fused BN differs from eager's in the last
    bits, and an activation that close to a rounding tie can land on the
    other integer; such flips are rare, so the losses agree to about 1e-3.
    """
    from mmdrq.models.multi_precision import _COMPILED
    torch.manual_seed(0)
    eager = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    compiled = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                                 compile=True)
    compiled.load_state_dict(eager.state_dict())
    wrappers = [OptimWrapper(torch.optim.SGD(m.parameters(), 0.01))
                for m in (eager, compiled)]
    assert compiled._runner() is compiled.architecture  # scales not set yet
    first = [m.train_step(classifier_batch(), w) for m, w in zip((eager, compiled),
                                                       wrappers)]
    assert first[0]['loss'] == first[1]['loss']  # both eager so far
    assert compiled._runner() is _COMPILED[compiled] is not None
    assert eager._runner() is eager.architecture
    data = eager.data_preprocessor(classifier_batch(), True)
    for bit in (8, 4):
        losses = []
        for model in (eager, compiled):
            mmdrq.set_bits(model, bit)
            losses.append(model(**data, mode='loss')['loss'])
        torch.testing.assert_close(losses[1], losses[0], rtol=5e-3, atol=0)
    logs = [compiled.train_step(classifier_batch(), wrappers[1]) for _ in range(2)]
    assert all(torch.isfinite(log['loss']) for log in logs)
    compiled.eval()
    assert compiled._runner() is compiled.architecture  # eval stays eager


def test_compile_option_stays_eager_under_a_bit_sampler(small_classifier,
                                                         mmengine_caplog):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                              compile=dict(mode='default'))
    model.bit_sampler = object()  # any sampler: bits vary per layer
    assert model._runner() is model.architecture
    assert 'per-layer bit sampler' in mmengine_caplog.text
    with pytest.raises(TypeError, match='compile'):
        MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]),
                          compile='yes')
