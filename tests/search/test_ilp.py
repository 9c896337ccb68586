"""The SubNet ILP against brute force, and its errors."""
import itertools

import numpy as np
import pytest

from mmdrq.search.ilp import feasible_range, pareto_sweep, search_subnet


def instance(seed, layers=5):
    rng = np.random.default_rng(seed)
    names = [f'l{i}' for i in range(layers)]
    traces = {n: float(rng.exponential()) for n in names}
    costs = {n: dict(macs=int(rng.integers(1, 50)) * 1000,
                     params=int(rng.integers(1, 40)) * 100) for n in names}
    return traces, costs


def perturbations_of(seed, traces, bits):
    """Errors that shrink about 4x per bit, with per-layer noise."""
    rng = np.random.default_rng(seed + 100)
    return {n: {b: float(rng.uniform(0.5, 2.0) * 4.0**-b) for b in bits}
            for n in traces}


def score(traces, perturbations, name, bit):
    if perturbations is None:
        return traces[name] * bit
    return -traces[name] * perturbations[name][bit]


def measure(kind, layer_bits, costs, fp):
    if kind == 'avg_bits':
        return sum(layer_bits.values()) / len(layer_bits)
    if kind == 'bitops':
        return sum(costs[n]['macs'] * b * b for n, b in layer_bits.items())
    return sum(costs[n]['params'] * b / 8 for n, b in layer_bits.items()) + fp


def brute_force(traces, costs, bits, kind, budget, fp, perturbations):
    names, best = list(costs), None
    for combo in itertools.product(bits, repeat=len(names)):
        layer_bits = dict(zip(names, combo))
        if measure(kind, layer_bits, costs, fp) <= budget + 1e-9:
            value = sum(score(traces, perturbations, n, b)
                        for n, b in layer_bits.items())
            best = value if best is None else max(best, value)
    return best


@pytest.mark.parametrize('kind', ['avg_bits', 'bitops', 'size'])
@pytest.mark.parametrize('bits', [[8, 6, 4, 2], [4, 3, 2]])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('objective', ['trace_bits', 'perturbation'])
@pytest.mark.parametrize('magnitude', [1.0, 1e-7])
def test_optimum_equals_brute_force(kind, bits, seed, objective, magnitude):
    """Also at the tiny scale of real traces times weight errors."""
    traces, costs = instance(seed)
    traces = {n: t * magnitude for n, t in traces.items()}
    perturbations = perturbations_of(seed, traces, bits) \
        if objective == 'perturbation' else None
    fp = 1234.0
    lo, hi = feasible_range(costs, bits, kind, fp_bytes=fp)
    for fraction in (0.0, 0.2, 0.45, 0.7, 1.0):
        budget = lo + fraction * (hi - lo)
        got = search_subnet(traces, costs, bits, kind, budget, fp_bytes=fp,
                            perturbations=perturbations)
        assert set(got.values()) <= set(bits)
        assert measure(kind, got, costs, fp) <= budget + 1e-6 * abs(budget)
        value = sum(score(traces, perturbations, n, b)
                    for n, b in got.items())
        assert value == pytest.approx(brute_force(
            traces, costs, bits, kind, budget, fp, perturbations), rel=1e-9,
            abs=0)


def test_range_ends_are_uniform_models():
    traces, costs = instance(4)
    lo, hi = feasible_range(costs, [8, 4, 2], 'bitops')
    assert set(search_subnet(traces, costs, [8, 4, 2], 'bitops',
                             lo).values()) == {2}
    assert set(search_subnet(traces, costs, [8, 4, 2], 'bitops',
                             hi).values()) == {8}
    rows = pareto_sweep(traces, costs, [8, 4, 2], 'avg_bits', [3.0, 5.0])
    assert [r['achieved'] <= r['budget'] + 1e-9 for r in rows] == [True] * 2
    assert rows[0]['objective'] <= rows[1]['objective']


def test_errors_name_the_budget_and_range():
    traces, costs = instance(5)
    lo, hi = feasible_range(costs, [8, 4, 2], 'avg_bits')
    with pytest.raises(ValueError, match=r'avg_bits budget 1.5 is infeasible'
                       r'.*\[2, 8\]'):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 1.5)
    with pytest.raises(ValueError, match="'flops'.*avg_bits"):
        search_subnet(traces, costs, [8, 4, 2], 'flops', 3)
    perturbations = perturbations_of(5, traces, [8, 4])
    with pytest.raises(ValueError, match=r"lack .*'l0': \[2\]"):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 3,
                      perturbations=perturbations)
    del traces['l0']
    with pytest.raises(ValueError, match=r"missing traces for \['l0'\]"):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 3)
