"""Hutchinson traces against exact float64 Hessians, through the STE of the
fake quantizers, through OpenMMLab models, and the traces file."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import mmdrq
from mmdrq.quantization import QLinear
from mmdrq.search.hessian import (hutchinson_traces, load_traces,
                                  model_traces, quantized_weights,
                                  save_traces)


def rademacher_stderr(hessian, index, probes, per_tensor=True):
    """Standard error of the mean of ``v_I . (H v)_I`` over probes: with v
    Rademacher, Var = 2 * (sum of squared off-diagonal entries of H_II),
    plus, when v is nonzero outside I, the squared entries of the rows I
    outside the block."""
    rows = hessian[index]
    block = rows[:, index]
    var = 2 * float((block ** 2).sum() - (block.diagonal() ** 2).sum())
    if not per_tensor:
        var += float((rows ** 2).sum() - (block ** 2).sum())
    return math.sqrt(var / probes)


def conv_net_problem():
    """A conv + linear net of 264 float64 weights, its loss of the flat
    weight vector, and each tensor's slice of that vector."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (8, ), generator=g)
    shapes = dict(conv=(4, 2, 3, 3), fc=(3, 64))
    slices, start = {}, 0
    for name, shape in shapes.items():
        slices[name] = slice(start, start + math.prod(shape))
        start += math.prod(shape)

    def loss_of(flat):
        conv = flat[slices['conv']].reshape(shapes['conv'])
        fc = flat[slices['fc']].reshape(shapes['fc'])
        h = torch.tanh(F.conv2d(x, conv))  # (8, 4, 4, 4)
        return F.cross_entropy(h.flatten(1) @ fc.T, labels)

    point = torch.randn(start, generator=g, dtype=torch.float64) * 0.5
    return point, slices, shapes, loss_of


@pytest.mark.parametrize('per_tensor', [True, False])
def test_hutchinson_matches_the_exact_trace(per_tensor):
    point, slices, shapes, loss_of = conv_net_problem()
    hessian = torch.autograd.functional.hessian(loss_of, point)
    params = {n: point[s].reshape(shapes[n]).clone().requires_grad_()
              for n, s in slices.items()}
    flat = lambda: torch.cat([p.flatten() for p in params.values()])  # noqa
    batches, per_batch = 20, 100
    traces = hutchinson_traces(
        lambda _: loss_of(flat()), params, [None] * batches,
        max_probes=per_batch, min_probes=per_batch,
        generator=torch.Generator().manual_seed(1), per_tensor=per_tensor)
    for name, index in slices.items():
        index = torch.arange(index.start, index.stop)
        exact = float(hessian[index][:, index].diagonal().sum())
        stderr = rademacher_stderr(hessian, index, batches * per_batch,
                                   per_tensor)
        assert stderr < 0.2 * abs(exact), name  # the check is not vacuous
        assert traces[name]['trace'] == pytest.approx(exact, abs=4 * stderr)
        assert traces[name]['numel'] == len(index)
        assert traces[name]['trace_per_param'] == pytest.approx(
            traces[name]['trace'] / len(index), rel=1e-12)
        assert traces[name]['probes'] == batches * per_batch


def test_stops_early_when_probes_agree():
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, dtype=torch.float64, requires_grad=True)
    scale = torch.arange(1, 8, dtype=torch.float64)
    calls = []
    # diagonal Hessian: v.Hv = sum 2 scale_i v_i^2 = the trace, every probe
    traces = hutchinson_traces(
        lambda _: (scale * w * w).sum() + u.sum(), {'w': w, 'u': u},
        [None, None], max_probes=50, min_probes=1,
        progress=lambda step, total: calls.append((step, total)))
    assert traces['w']['trace'] == pytest.approx(2 * float(scale.sum()))
    assert traces['u']['trace'] == 0.0  # linear: no second derivative
    assert traces['w']['probes'] == 2 * 3  # 1 + two unchanged, per batch
    assert calls == [(1, 2), (2, 2)]
    # off-diagonal terms make every probe differ: runs to max_probes
    a = torch.randn(7, dtype=torch.float64)
    noisy = hutchinson_traces(
        lambda _: (a @ w) ** 2, {'w': w}, iter([None]), max_probes=12,
        min_probes=1, tol=1e-6, generator=torch.Generator().manual_seed(0))
    assert noisy['w']['probes'] == 12


def test_bad_options_are_named():
    w = torch.zeros(2, requires_grad=True)
    for max_probes, min_probes in ((2, 3), (0, 0)):
        with pytest.raises(ValueError, match='min_probes'):
            hutchinson_traces(lambda _: w.sum(), {'w': w}, [None],
                              max_probes=max_probes, min_probes=min_probes)
    with pytest.raises(ValueError, match="params\\['v'\\]"):
        hutchinson_traces(lambda _: w.sum(), {'v': torch.zeros(2)}, [None])
    with pytest.raises(ValueError, match='batches is empty'):
        hutchinson_traces(lambda _: w.sum(), {'w': w}, [])


def quantized_problem():
    """Two QLinear layers (weight and input quantized, 2 of bits (4, 2),
    so weights clip) and the same function with the straight-through
    estimator written out: constants plus mask * (w - w.detach())."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    first = QLinear(5, 6, bits=(4, 2)).double()
    second = QLinear(6, 3, bits=(4, 2)).double()
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (16, ), generator=g)
    for layer in (first, second):
        layer.bit = 2
    second(torch.tanh(first(x)))  # initialise the quantizer scales

    def quantized(w1, w2):
        first.weight, second.weight = w1, w2
        return F.cross_entropy(second(torch.tanh(first(x))), labels)

    def ste(fn, value):
        value = value.detach().requires_grad_()
        (mask, ) = torch.autograd.grad(fn(value).sum(), value)
        return lambda t: fn(t.detach()).detach() + mask * (t - t.detach())

    def linearised(w1, w2):
        a1 = first.act_quantizer(x, 2)
        h = torch.tanh(F.linear(
            a1, ste(lambda t: first.weight_quantizer(t, 2), w1)(w1),
            first.bias.detach()))
        a2 = ste(lambda t: second.act_quantizer(t, 2), h)(h)
        logits = F.linear(
            a2, ste(lambda t: second.weight_quantizer(t, 2), w2)(w2),
            second.bias.detach())
        return F.cross_entropy(logits, labels)

    weights = (torch.nn.Parameter(first.weight.detach().clone()),
               torch.nn.Parameter(second.weight.detach().clone()))
    return quantized, linearised, weights, first


def test_double_backward_through_the_ste_is_the_linearised_hessian():
    quantized, linearised, (w1, w2), first = quantized_problem()
    blocks = torch.autograd.functional.hessian(linearised, (w1, w2))
    hessian = torch.cat([torch.cat([b.reshape(w.numel(), -1) for b in row],
                                   dim=1) for w, row in zip((w1, w2), blocks)])
    assert quantized(w1, w2).item() == pytest.approx(
        linearised(w1, w2).item(), rel=1e-12)
    grads = torch.autograd.grad(quantized(w1, w2), (w1, w2),
                                create_graph=True)
    v = torch.randn(hessian.shape[0], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    hv = torch.autograd.grad(grads, (w1, w2), grad_outputs=(
        v[:30].view(6, 5), v[30:].view(3, 6)))
    torch.testing.assert_close(torch.cat([h.flatten() for h in hv]),
                               hessian @ v, rtol=1e-10, atol=1e-12)
    # clipped weights: zero Hessian rows (the mask), so nothing in the trace
    v1 = w1.detach() / (first.weight_quantizer.scale.detach().view(-1, 1) * 4)
    clipped = ((v1 < -2) | (v1 > 1)).flatten()
    assert clipped.any() and not clipped.all()
    assert hessian[:30][clipped].abs().max() == 0
    assert hessian[:30][~clipped].abs().max() > 0
    traces = hutchinson_traces(
        lambda _: quantized(w1, w2), {'w1': w1, 'w2': w2}, [None] * 10,
        max_probes=100, min_probes=100,
        generator=torch.Generator().manual_seed(5))
    for name, index in (('w1', torch.arange(30)),
                        ('w2', torch.arange(30, 48))):
        exact = float(hessian[index][:, index].diagonal().sum())
        assert traces[name]['trace'] == pytest.approx(
            exact, abs=4 * rademacher_stderr(hessian, index, 1000))


def classifier_batches(count, size=16, per_batch=4):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(2)
    return [dict(inputs=[torch.randint(0, 256, (3, size, size), generator=g,
                                       dtype=torch.uint8)
                         for _ in range(per_batch)],
                 data_samples=[DataSample().set_gt_label(i % 10)
                               for i in range(per_batch)])
            for _ in range(count)]


@pytest.fixture
def qat_classifier(small_classifier):
    from mmdrq.models import MultiPrecisionQAT
    torch.manual_seed(0)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    model.eval()
    with torch.no_grad():  # initialise the quantizer scales
        model(**model.data_preprocessor(classifier_batches(1)[0], False),
              mode='tensor')
    model.train()
    return model


def test_model_traces_are_the_models_own_loss_at_the_highest_bit(
        qat_classifier):
    model, arch = qat_classifier, qat_classifier.architecture
    names = list(mmdrq.get_bits(arch))
    assert names[0] == 'backbone.layer1.0.conv1'  # the stem stays FP
    frozen = arch.backbone.layer1[0].conv1.weight
    frozen.requires_grad_(False)
    mmdrq.set_bits(arch, 4)
    options = dict(max_probes=3, min_probes=3)
    traces = model_traces(model, classifier_batches(5), num_samples=8,
                          generator=torch.Generator().manual_seed(7),
                          **options)
    assert list(traces) == names  # no 'architecture.' prefix
    assert {t['probes'] for t in traces.values()} == {2 * 3}  # 8 images
    assert all(math.isfinite(t['trace']) for t in traces.values())
    assert traces[names[0]]['trace'] != 0  # the frozen layer is traced
    # everything restored
    assert model.training and not frozen.requires_grad
    assert set(mmdrq.get_bits(arch).values()) == {4}
    assert arch.head.fc.weight.requires_grad

    # the same estimate by hand: eval mode, bit 8, the model's own loss
    frozen.requires_grad_(True)
    model.eval()
    mmdrq.set_bits(arch, 8)

    def loss_fn(batch):
        data = model.data_preprocessor(batch, True)
        return model.parse_losses(model(**data, mode='loss'))[0]
    by_hand = hutchinson_traces(loss_fn, quantized_weights(model),
                                classifier_batches(2),
                                generator=torch.Generator().manual_seed(7),
                                **options)
    for name in names:
        assert traces[name]['trace'] == pytest.approx(
            by_hand[name]['trace'], rel=1e-6, abs=1e-9), name


def test_per_tensor_model_traces_are_positive(qat_classifier):
    # in the STE-linearised ReLU net each layer's block is J^T H_CE J (PSD),
    # so every per-tensor probe is >= 0; joint probes need not be
    traces = model_traces(qat_classifier, classifier_batches(1),
                          num_samples=4, max_probes=2, min_probes=2,
                          generator=torch.Generator().manual_seed(0))
    assert all(t['trace'] > 0 for t in traces.values()), traces


def test_traces_file_round_trip_and_other_models(qat_classifier, tmp_path,
                                                 small_classifier):
    from mmdrq.models import MultiPrecisionQAT
    names = list(mmdrq.get_bits(qat_classifier.architecture))
    traces = {n: dict(trace=float(i), numel=10, trace_per_param=i / 10,
                      probes=4) for i, n in enumerate(names)}
    path = str(tmp_path / 'traces.json')
    save_traces(path, traces, dict(num_samples=8), model=qat_classifier)
    assert [p.name for p in tmp_path.iterdir()] == ['traces.json']
    with open(path) as f:
        content = json.load(f)
    assert content['format'] == 'mmdrq-traces'
    assert content['model'] == 'ImageClassifier'
    assert content['meta'] == dict(num_samples=8)
    assert load_traces(path, qat_classifier) == traces
    bare = mmdrq.quantize_model(small_classifier(), dict(bits=[8, 4]))
    assert load_traces(path, bare) == traces  # same names, no wrapper

    other = MultiPrecisionQAT(small_classifier(), dict(
        bits=[8, 4], skip=[r'backbone\.layer3\.1\.conv2']))
    with pytest.raises(ValueError, match=r'another model.*missing from it '
                       r"\[\].*lacks \['backbone.layer3.1.conv2'\]"):
        load_traces(path, other)

    nan = dict(traces, **{names[1]: dict(traces[names[1]],
                                         trace_per_param=float('nan'))})
    with pytest.raises(ValueError, match=names[1]):
        save_traces(path, nan, {})
    assert load_traces(path, qat_classifier) == traces  # left intact
    with open(path, 'w') as f:
        json.dump(dict(format='other'), f)
    with pytest.raises(ValueError, match="format 'other'"):
        load_traces(path, qat_classifier)


def test_traces_reach_transposed_conv_and_attention():
    """The traced tensors are the new layers' own parameters (attention:
    the packed in_proj_weight; out_proj a layer of its own), and the
    double backward runs through their forwards."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first = torch.nn.Conv2d(2, 4, 1)
            self.up = torch.nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
            self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
            self.last = torch.nn.Linear(4, 3)

        def forward(self, x):
            tokens = self.up(self.first(x)).flatten(2).transpose(1, 2)
            return self.last(torch.tanh(self.attn(tokens, tokens,
                                                  tokens)[0]).mean(1))

    model = mmdrq.quantize_model(Net().double(), bits=[4, 2])
    params = quantized_weights(model)
    assert params['up'] is model.up.weight
    assert params['attn'] is model.attn.in_proj_weight
    assert params['attn.out_proj'] is model.attn.out_proj.weight
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, ), generator=g)
    model(x)  # scales initialised before the traces
    traces = hutchinson_traces(
        lambda batch: F.cross_entropy(model(batch), labels), params, [x],
        max_probes=4, generator=g)
    assert set(traces) == set(params)
    for entry in traces.values():
        assert math.isfinite(entry['trace']) and entry['trace'] != 0


class DeformNet(torch.nn.Module):
    """conv -> DCNv2 (or a plain conv) -> tanh -> linear, all quantized."""

    def __init__(self, deformable):
        super().__init__()
        from mmcv.ops import ModulatedDeformConv2dPack
        self.first = torch.nn.Conv2d(2, 4, 1)
        self.dcn = ModulatedDeformConv2dPack(4, 4, 3, padding=1) \
            if deformable else torch.nn.Conv2d(4, 4, 3, padding=1)
        self.last = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.last(torch.tanh(self.dcn(self.first(x))).mean((2, 3)))


def deform_problem(deformable, dtype=torch.float64):
    torch.manual_seed(0)
    model = mmdrq.quantize_model(DeformNet(deformable).to(dtype),
                                 bits=[4, 2], skip_first_last=False).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=dtype)
    labels = torch.randint(0, 3, (3, ), generator=g)
    mmdrq.set_bits(model, 2)  # coarse grids: many roundings near the step
    model(x)  # scales initialised before the traces
    return model, x, lambda batch: F.cross_entropy(model(batch), labels)


@pytest.mark.parametrize('per_tensor', [True, False])
def test_finite_difference_traces_match_autograd(per_tensor):
    """Same probes, float64: the central differences of gradients through
    the straight-through linearised quantizers are the double backward's
    products up to O(eps^2) (eps ~ 6e-6 RMS: ~1e-10 relative), far inside
    the 1e-7 asked. Without the linearisation a 2-bit rounding flipped by
    the step would add a whole grid step / eps to the gradient."""
    model, x, loss_fn = deform_problem(deformable=False)
    params = quantized_weights(model)
    weights = {n: p.detach().clone() for n, p in params.items()}
    traces = {hvp: hutchinson_traces(
        loss_fn, params, [x, x * 0.5], max_probes=4, min_probes=4,
        generator=torch.Generator().manual_seed(2), per_tensor=per_tensor,
        hvp=hvp) for hvp in ('autograd', 'finite_difference')}
    for name in params:
        exact = traces['autograd'][name]['trace']
        assert exact != 0
        assert traces['finite_difference'][name]['trace'] == pytest.approx(
            exact, rel=1e-7), name
        assert traces['finite_difference'][name]['hvp'] == \
            'finite_difference'
        assert torch.equal(params[name], weights[name])  # restored exactly


def test_deformable_conv_traces_by_finite_differences():
    """mmcv's DCN backward is once_differentiable: a double backward drops
    its second derivatives silently (every layer up to it would trace 0),
    so ``auto`` takes finite differences and ``autograd`` refuses."""
    from mmdrq.search.hessian import once_differentiable_ops
    model, x, loss_fn = deform_problem(deformable=True)
    assert once_differentiable_ops(loss_fn(x)) == \
        ['ModulatedDeformConv2dFunction']
    params = quantized_weights(model)
    assert set(params) == {'first', 'dcn', 'dcn.conv_offset', 'last'}
    with pytest.raises(ValueError, match="hvp='autograd'.*"
                       'ModulatedDeformConv2dFunction'):
        hutchinson_traces(loss_fn, params, [x], hvp='autograd')
    generator = torch.Generator().manual_seed(3)
    traces = hutchinson_traces(loss_fn, params, [x], max_probes=6,
                               min_probes=6, generator=generator)
    for name, entry in traces.items():
        assert entry['hvp'] == 'finite_difference'
        assert math.isfinite(entry['trace']) and entry['trace'] != 0, name
    # the last layer's block does not reach the DCN's backward twice: a
    # double backward of it alone, on the same probes, is exact
    generator.manual_seed(3)
    last = params['last']
    (grad, ) = torch.autograd.grad(loss_fn(x), last, create_graph=True)
    exact = 0.0
    for _ in range(6):
        skipped = [torch.randint(0, 2, p.shape, generator=generator)
                   for p in list(params.values())[:3]]
        v = torch.randint(0, 2, last.shape, generator=generator).double() \
            * 2 - 1
        (hv, ) = torch.autograd.grad(grad, last, v, retain_graph=True)
        exact += float((v * hv).sum()) / 6
    assert skipped and traces['last']['trace'] == pytest.approx(exact,
                                                                rel=1e-7)


def test_first_samples_count_batches_of_endless_loaders():
    """An iteration-based config's loader (InfiniteSampler) never ends: the
    batches are those of ``num_samples``, not of one pass; a finite loader
    stops at its end."""
    from mmengine.dataset import DefaultSampler, InfiniteSampler
    from torch.utils.data import DataLoader

    from mmdrq.search.calibration import FirstSamples
    data = [dict(inputs=torch.zeros(1)) for _ in range(8)]
    for sampler, batches in ((InfiniteSampler(data, seed=0), 5),
                             (DefaultSampler(data, seed=0), 2)):
        loader = DataLoader(data, batch_size=4, sampler=sampler)
        samples = FirstSamples(loader, 20)
        assert len(samples) == batches
        assert sum(1 for _ in samples) == batches
