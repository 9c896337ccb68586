"""The SubNet ILP against brute force, and its errors."""
import itertools
import re

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


@pytest.mark.parametrize('kind', ['avg_bits', 'bitops', 'size'])
@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_ties_spend_the_budget(kind, seed):
    """Measured increases, monotone, are exactly 0 at several bits of many
    layers: of the SubNets with the best score, ``max`` returns one of the
    highest cost under the budget (brute force), not an arbitrary one that
    leaves the budget unspent."""
    bits = [8, 6, 4, 2]
    traces, costs = instance(seed)
    rng = np.random.default_rng(seed + 7)
    increases = {}
    for name in traces:  # 0 down to a random bit, then growing
        free = int(rng.integers(0, len(bits) + 1))
        steps = np.cumsum(rng.uniform(0.1, 1.0, len(bits)))
        increases[name] = {b: 0.0 if i < free else float(steps[i] * 1e-3)
                           for i, b in enumerate(bits)}
    ones = dict.fromkeys(traces, 1.0)
    fp = 1234.0
    lo, hi = feasible_range(costs, bits, kind, fp_bytes=fp)
    names = list(costs)
    for fraction in (0.3, 0.6, 0.9, 1.0):
        budget = lo + fraction * (hi - lo)
        best_value, best_cost = None, None
        for combo in itertools.product(bits, repeat=len(names)):
            layer_bits = dict(zip(names, combo))
            cost = measure(kind, layer_bits, costs, fp)
            if cost > budget + 1e-9 * abs(budget):
                continue
            value = -sum(increases[n][b] for n, b in layer_bits.items())
            if best_value is None or value > best_value + 1e-12 or (
                    value >= best_value - 1e-12 and cost > best_cost):
                best_value, best_cost = value, cost
        got = search_subnet(ones, costs, bits, kind, budget, fp_bytes=fp,
                            perturbations=increases)
        value = -sum(increases[n][b] for n, b in got.items())
        assert value == pytest.approx(best_value, rel=1e-9, abs=1e-12)
        assert measure(kind, got, costs, fp) == pytest.approx(best_cost,
                                                              rel=1e-12)


def nearest_cost_brute_force(traces, costs, bits, kind, budget, fp,
                             perturbations):
    """(the cost nearest ``budget`` that any SubNet has, the lower of two
    equally near; the best score among the SubNets of that cost)."""
    names, subnets = list(costs), []
    for combo in itertools.product(bits, repeat=len(names)):
        layer_bits = dict(zip(names, combo))
        subnets.append((measure(kind, layer_bits, costs, fp),
                        sum(score(traces, perturbations, n, b)
                            for n, b in layer_bits.items())))
    tol = 1e-9 * max(abs(c) for c, _ in subnets)
    distance = min(abs(c - budget) for c, _ in subnets)
    near = [c for c, _ in subnets if abs(c - budget) <= distance + tol]
    nearest = min(near)  # the lower one when two are equally near
    return nearest, max(v for c, v in subnets if abs(c - nearest) <= tol)


@pytest.mark.parametrize('kind', ['avg_bits', 'bitops', 'size'])
@pytest.mark.parametrize('bits', [[8, 6, 4, 2], [4, 3, 2]])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('objective', ['trace_bits', 'perturbation'])
def test_exact_budget_equals_brute_force(kind, bits, seed, objective):
    """``budget_mode='exact'``: the nearest cost any SubNet has (the budget
    itself when some SubNet costs exactly that; the lower of two equally
    near), the best objective among the SubNets of that cost. Budgets:
    spread over the range, costs that SubNets have, and midpoints between
    two neighbouring costs (ties)."""
    traces, costs = instance(seed, layers=4)
    perturbations = perturbations_of(seed, traces, bits) \
        if objective == 'perturbation' else None
    fp = 1234.0
    lo, hi = feasible_range(costs, bits, kind, fp_bytes=fp)
    rng = np.random.default_rng(seed + 7)
    achievable = sorted({measure(kind, dict(zip(costs, combo)), costs, fp)
                         for combo in itertools.product(bits, repeat=4)})
    picks = rng.choice(len(achievable) - 1, 3, replace=False)
    budgets = [lo + f * (hi - lo) for f in (0.0, 0.3, 0.55, 1.0)]
    budgets += [achievable[i] for i in picks]
    budgets += [(achievable[i] + achievable[i + 1]) / 2 for i in picks]
    for budget in budgets:
        got = search_subnet(traces, costs, bits, kind, budget, fp_bytes=fp,
                            perturbations=perturbations, budget_mode='exact')
        nearest, best = nearest_cost_brute_force(
            traces, costs, bits, kind, budget, fp, perturbations)
        assert measure(kind, got, costs, fp) == pytest.approx(
            nearest, rel=1e-12), budget
        value = sum(score(traces, perturbations, n, b)
                    for n, b in got.items())
        assert value == pytest.approx(best, rel=1e-9, abs=0), budget


def test_exact_average_bits_is_the_papers_equality():
    """{8,6,4,2} over 4 layers: average 5 is a sum of 20, which SubNets
    have (never the lower budget that ``max`` may settle for when a higher
    cost scores no better); 5.25 (sum 21, odd) lies between 5 and 5.5 and
    takes the lower."""
    traces = {'a': 1.0, 'b': 1.0, 'c': 1.0, 'd': 1.0}
    costs = {n: dict(macs=1, params=1) for n in traces}
    bits = [8, 6, 4, 2]
    # perturbations equal at 6 and 8 bits: max mode may stop below 5
    flat = {n: {8: 0.0, 6: 0.0, 4: 1.0, 2: 4.0} for n in traces}
    for budget, expected in ((5.0, 5.0), (5.25, 5.0), (5.3, 5.5)):
        got = search_subnet(traces, costs, bits, 'avg_bits', budget,
                            perturbations=flat, budget_mode='exact')
        assert sum(got.values()) / 4 == expected


@pytest.mark.parametrize('mode', ['max', 'exact'])
@pytest.mark.parametrize('kind', ['avg_bits', 'bitops', 'size'])
def test_budgets_outside_the_range_are_errors(mode, kind):
    """Above the range too: ``max`` used to return the all-8-bit model for
    an average of 10 bits."""
    traces, costs = instance(3)
    lo, hi = feasible_range(costs, [8, 4, 2], kind, fp_bytes=100.0)
    for budget in (lo * 0.9, hi * 1.1, 10.0 if kind == 'avg_bits' else
                   hi + 1):
        with pytest.raises(ValueError, match=rf'{kind} budget .* is '
                           r'infeasible: the feasible range is ' +
                           re.escape(f'[{lo:g}, {hi:g}]')):
            search_subnet(traces, costs, [8, 4, 2], kind, budget,
                          fp_bytes=100.0, budget_mode=mode)
    # the ends themselves, printed with %g and typed back in, are inside
    for budget in (lo, hi, float(f'{lo:.12g}'), float(f'{hi:.12g}')):
        got = search_subnet(traces, costs, [8, 4, 2], kind, budget,
                            fp_bytes=100.0, budget_mode=mode)
        assert len(set(got.values())) == 1
    # a sweep checks every budget before it solves any
    with pytest.raises(ValueError, match='infeasible'):
        pareto_sweep(traces, costs, [8, 4, 2], kind, [hi, hi * 1.1],
                     fp_bytes=100.0, budget_mode=mode)


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
    with pytest.raises(ValueError, match="budget_mode 'equal'.*'max', "
                       "'exact'"):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 3,
                      budget_mode='equal')
    perturbations = perturbations_of(5, traces, [8, 4])
    with pytest.raises(ValueError, match=r"lack .*'l0': \[2\]"):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 3,
                      perturbations=perturbations)
    del traces['l0']
    with pytest.raises(ValueError, match=r"missing traces for \['l0'\]"):
        search_subnet(traces, costs, [8, 4, 2], 'avg_bits', 3)
