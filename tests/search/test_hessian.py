"""Hutchinson traces against exact float64 traces; model traces; files."""
import pytest
import torch
from torch import nn

import mmdrq
from mmdrq.search.hessian import (hutchinson_traces, load_traces,
                                  model_traces, save_traces)


def small_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    w1 = torch.randn(4, 5, generator=g, dtype=torch.float64,
                     requires_grad=True)
    w2 = torch.randn(2, 4, generator=g, dtype=torch.float64,
                     requires_grad=True)

    def loss_of(a, b):
        return ((torch.tanh(x @ a.T) @ b.T - y) ** 2).mean()
    return w1, w2, loss_of


def exact_block(loss_of, w1, w2, which):
    """Hessian block of one tensor, by autograd in float64."""
    if which == 0:
        h = torch.autograd.functional.hessian(lambda a: loss_of(a, w2), w1)
        return h.reshape(w1.numel(), w1.numel())
    h = torch.autograd.functional.hessian(lambda b: loss_of(w1, b), w2)
    return h.reshape(w2.numel(), w2.numel())


def test_hutchinson_matches_the_exact_trace():
    w1, w2, loss_of = small_problem()
    probes = 40 * 100
    traces = hutchinson_traces(
        lambda _: loss_of(w1, w2), {'w1': w1, 'w2': w2}, [None] * 40,
        max_probes=100, min_probes=100,
        generator=torch.Generator().manual_seed(1))
    for i, name in enumerate(('w1', 'w2')):
        h = exact_block(loss_of, w1, w2, i)
        exact = float(h.diagonal().sum())
        # Var(v.Hv) = 2 * sum of squared off-diagonal entries
        off = float((h ** 2).sum() - (h.diagonal() ** 2).sum())
        stderr = (2 * off / probes) ** 0.5
        assert abs(traces[name]['trace'] - exact) < 4 * stderr + 1e-12, name
        assert traces[name]['trace_per_param'] == pytest.approx(
            traces[name]['trace'] / traces[name]['numel'])
    assert traces['w1']['numel'] == 20


def test_probe_products_are_exact_hessian_vector_products():
    w1, w2, loss_of = small_problem()
    h = exact_block(loss_of, w1, w2, 0)
    grads = torch.autograd.grad(loss_of(w1, w2), [w1], create_graph=True)
    v = torch.randint(0, 2, w1.shape,
                      generator=torch.Generator().manual_seed(5)).double()
    v = v * 2 - 1
    (hv, ) = torch.autograd.grad(grads, [w1], grad_outputs=[v])
    torch.testing.assert_close(hv.flatten(), h @ v.flatten(), rtol=1e-10,
                               atol=1e-12)


def test_diagonal_hessian_converges_after_the_minimum():
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    scale = torch.arange(1, 8, dtype=torch.float64)
    traces = hutchinson_traces(lambda _: (scale * w * w).sum(), {'w': w},
                               [None], max_probes=50, min_probes=3)
    # v.Hv = sum 2*scale_i v_i^2 = exact for any Rademacher v
    assert traces['w']['trace'] == pytest.approx(2 * float(scale.sum()))
    assert traces['w']['probes'] == 3


def classifier_batches(count=2, size=16):
    from mmpretrain.structures import DataSample
    g = torch.Generator().manual_seed(2)
    return [dict(inputs=[torch.randint(0, 256, (3, size, size), generator=g,
                                       dtype=torch.uint8) for _ in range(4)],
                 data_samples=[DataSample().set_gt_label(i % 10)
                               for i in range(4)]) for _ in range(count)]


def test_model_traces_through_the_quantizers(small_classifier, tmp_path):
    from mmdrq.models import MultiPrecisionQAT
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    model.train()
    model.train_step(classifier_batches(1)[0], _NoStep())  # init scales
    traces = model_traces(model, classifier_batches(), num_samples=8,
                          max_probes=3, min_probes=2)
    names = set(mmdrq.get_bits(model.architecture))
    assert set(traces) == names
    assert all(torch.isfinite(torch.tensor(t['trace']))
               for t in traces.values())
    assert sum(t['trace'] for t in traces.values()) > 0
    assert model.training  # mode restored
    path = str(tmp_path / 'traces.json')
    save_traces(path, traces, dict(checkpoint='none'))
    assert set(load_traces(path, model)) == names
    other = MultiPrecisionQAT(_Other(), dict(bits=[8, 4]))
    with pytest.raises(ValueError, match='another model'):
        load_traces(path, other)


class _NoStep:
    """Stands in for an optimizer wrapper where only forwards matter."""

    def optim_context(self, model):
        import contextlib
        return contextlib.nullcontext()

    def update_params(self, loss):
        pass


class _Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(4, 4, 3)
        self.c = nn.Conv2d(4, 2, 1)
