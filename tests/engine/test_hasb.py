"""HASB: sigma schedule, bit distributions, seeded sampling."""
import re

import pytest
import torch
from mmengine.hooks import Hook
from scipy.stats import chisquare

import mmdrq
from mmdrq.engine import HASBHook, sigma_schedule
from mmdrq.models import MultiPrecisionQAT
from mmdrq.quantization.bit_sampler import BitSampler, hasb_probabilities

from conftest import build_iter_runner

BITS = (8, 6, 4, 2)


def test_sigma_schedule_per_epoch():
    expected = [0.0, 0.0] + [0.5 * (e + 1) / 10 for e in range(2, 10)]
    got = [sigma_schedule(e, 10, 0.5, 2) for e in range(10)]
    assert got == pytest.approx(expected, abs=0)
    assert sigma_schedule(9, 10, 0.5, 0) == 0.5


def test_sensitive_layers_get_bit_proportional_probabilities():
    probs = hasb_probabilities({'a': 1.0, 'b': 3.0, 'c': 2.0}, BITS)
    assert probs['b'] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert probs['c'] == pytest.approx([0.4, 0.3, 0.2, 0.1])  # == mean
    assert probs['a'] == pytest.approx([0.25] * 4)


@pytest.mark.parametrize('sigma', [1.0, 0.3])
def test_sampling_frequencies_match_the_configuration(sigma):
    probs = hasb_probabilities({'hot': 2.0, 'cold': 0.0}, BITS)
    sampler = BitSampler(probs, BITS, seed=123)
    sampler.sigma = sigma
    draws = 20000
    counts = {name: {b: 0 for b in BITS} for name in probs}
    for i in range(draws):
        sampler.reseed(i)
        for name, bit in sampler.draw(4).items():
            counts[name][bit] += 1
    for name, p in probs.items():
        # keep the global bit 4 with 1 - sigma, else draw from p
        expected = [draws * (sigma * q + (1 - sigma) * (b == 4))
                    for b, q in zip(BITS, p)]
        observed = [counts[name][b] for b in BITS]
        assert chisquare(observed, expected).pvalue > 1e-3, (name, observed)


def test_draws_are_reproducible_per_iteration():
    probs = hasb_probabilities({f'l{i}': float(i) for i in range(20)}, BITS)
    a, b = BitSampler(probs, BITS, seed=5), BitSampler(probs, BITS, seed=5)
    a.sigma = b.sigma = 0.5
    a.reseed(17)
    first = [a.draw(8) for _ in range(4)]
    a.reseed(3)
    a.draw(8)
    b.reseed(17)
    assert [b.draw(8) for _ in range(4)] == first
    b.reseed(18)
    assert [b.draw(8) for _ in range(4)] != first


def test_apply_sets_layer_bits_and_reports_the_average(make_tiny_cnn):
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=list(BITS))
    names = list(mmdrq.get_bits(model))
    sampler = BitSampler({n: [0, 0, 0, 1.0] for n in names}, BITS)
    sampler.sigma = 1.0
    assert sampler.apply(model, 8) == 2.0
    assert set(mmdrq.get_bits(model).values()) == {2}
    sampler.sigma = 0.0
    assert sampler.apply(model, 6) == 6.0
    assert set(mmdrq.get_bits(model).values()) == {6}


def test_bad_inputs():
    with pytest.raises(ValueError, match='traces'):
        HASBHook()
    with pytest.raises(ValueError, match='sigma.*1.5'):
        HASBHook(uniform=True, sigma=1.5)
    for key, value, message in (
            ('uniform', 'yes', 'uniform must be True or False'),
            ('sigma', '0.5', r'sigma must be a finite number in \[0.0, 1.0\]'),
            ('warmup_epochs', -1, 'warmup_epochs must be an int >= 0'),
            ('seed', 1.5, 'seed must be an int >= 0'),
            ('traces', 3, 'traces must be a file path')):
        options = {'uniform': True, key: value}
        with pytest.raises(ValueError, match=f'HASBHook {message}, got '
                           f'{re.escape(repr(value))}'):
            HASBHook(**options)
    with pytest.raises(ValueError, match='summing to 1'):
        BitSampler({'a': [0.5, 0.4, 0.0, 0.0]}, BITS)


class RecordSigma(Hook):
    """sigma_t of each training iteration, as the model's sampler has it."""

    def __init__(self):
        self.sigmas = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.sigmas.append(runner.model.bit_sampler.sigma)


def test_iteration_based_runs_ramp_sigma_per_iteration(tmp_path,
                                                       small_classifier):
    """Detection and segmentation train by iterations (one epoch in all):
    sigma_t ramps per iteration, after ``warmup_iters``; the epochs' key
    is refused there, naming it and the loop."""
    torch.manual_seed(0)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)))
    record = RecordSigma()
    build_iter_runner(tmp_path, model, [
        HASBHook(uniform=True, warmup_iters=2), record], max_iters=5,
        validate=False).train()
    assert record.sigmas == pytest.approx(
        [0, 0, 0.5 * 3 / 5, 0.5 * 4 / 5, 0.5], abs=0)
    runner = build_iter_runner(tmp_path, model, [
        HASBHook(uniform=True, warmup_epochs=1)], max_iters=1,
        validate=False)
    with pytest.raises(ValueError, match='HASBHook warmup_epochs=1 does '
                       'not apply to IterBasedTrainLoop: give warmup_iters'):
        runner.train()
