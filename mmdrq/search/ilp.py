"""SubNet search as an integer linear program (scipy.optimize.milp;
docs/method.md, SubNet search).

One-hot binaries x[l, b] choose each layer's bit under one budget (average
bit-width, BitOps or model size). Objectives:

- ``trace_bits`` (the paper): maximise sum_l trace_l * bits_l, sensitive
  layers get more bits. Linear in the bits, so it picks extremes.
- ``perturbation`` (HAWQ-V2's criterion): minimise sum_l trace_l *
  ||Q_b(W_l) - W_l||^2, the loss increase a second-order expansion
  predicts; each layer's return on a bit diminishes, as its error does.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

BUDGET_KINDS = ('avg_bits', 'bitops', 'size')
OBJECTIVES = ('trace_bits', 'perturbation')


def _cost_rows(names, costs, bits, kind, fp_bytes) -> Tuple[np.ndarray, float]:
    """Budget = row @ x + offset, for the one-hot layout x[l * B + b]."""
    row = []
    for name in names:
        for b in bits:
            if kind == 'avg_bits':
                row.append(b / len(names))
            elif kind == 'bitops':
                row.append(costs[name]['macs'] * b * b)
            else:
                row.append(costs[name]['params'] * b / 8)
    return np.array(row, dtype=np.float64), fp_bytes if kind == 'size' \
        else 0.0


def _check(traces, costs, bits, kind):
    if kind not in BUDGET_KINDS:
        raise ValueError(f'budget kind {kind!r} is unknown; valid kinds: '
                         f'{list(BUDGET_KINDS)}')
    if not bits:
        raise ValueError(f'bits must not be empty, got {list(bits)}')
    if set(traces) != set(costs):
        raise ValueError(
            'traces and costs name different layers: missing traces for '
            f'{sorted(set(costs) - set(traces))}, traces of unknown layers '
            f'{sorted(set(traces) - set(costs))}')


def feasible_range(costs: Dict[str, dict], bits: Sequence[int], kind: str,
                   fp_bytes: float = 0) -> Tuple[float, float]:
    """Budget of the all-lowest-bit and of the all-highest-bit model."""
    _check(dict.fromkeys(costs, 0.0), costs, bits, kind)
    names = list(costs)
    row, offset = _cost_rows(names, costs, [min(bits)], kind, fp_bytes)
    high, _ = _cost_rows(names, costs, [max(bits)], kind, fp_bytes)
    return float(row.sum() + offset), float(high.sum() + offset)


def layer_scores(traces: Dict[str, float], bits: Sequence[int],
                 perturbations: Optional[Dict[str, Dict[int, float]]] = None
                 ) -> Dict[str, Dict[int, float]]:
    """What the ILP maximises per layer and bit: ``trace * bits``, or with
    ``perturbations`` (``{layer: {bit: ||Q_b(W) - W||^2}}``) minus
    ``trace * perturbation``."""
    if perturbations is None:
        return {n: {b: t * b for b in bits} for n, t in traces.items()}
    missing = {n: sorted(set(bits) - set(perturbations.get(n, {})))
               for n in traces}
    missing = {n: b for n, b in missing.items() if b}
    if missing:
        raise ValueError(f'perturbations lack these bits of these layers: '
                         f'{missing}')
    return {n: {b: -t * perturbations[n][b] for b in bits}
            for n, t in traces.items()}


def search_subnet(traces: Dict[str, float], costs: Dict[str, dict],
                  bits: Sequence[int], kind: str, budget: float,
                  fp_bytes: float = 0, perturbations=None) -> Dict[str, int]:
    """Per-layer bits with the best ``layer_scores`` (``trace * bits``
    unless ``perturbations`` are given) under budget <= ``budget``."""
    _check(traces, costs, bits, kind)
    lo, hi = feasible_range(costs, bits, kind, fp_bytes)
    if not lo - 1e-9 * abs(lo) <= budget:
        raise ValueError(f'{kind} budget {budget:g} is infeasible: the '
                         f'feasible range is [{lo:g}, {hi:g}]')
    names, bits = list(costs), list(bits)
    scores = layer_scores(traces, bits, perturbations)
    count = len(names) * len(bits)
    objective = -np.array([scores[n][b] for n in names for b in bits],
                          dtype=np.float64)
    # to order 1: HiGHS's absolute tolerances would blur tiny scores
    # (traces times weight errors are often below 1e-6)
    objective /= max(np.abs(objective).max(), np.finfo(np.float64).tiny)
    one_hot = np.zeros((len(names), count))
    for i in range(len(names)):
        one_hot[i, i * len(bits):(i + 1) * len(bits)] = 1
    row, offset = _cost_rows(names, costs, bits, kind, fp_bytes)
    result = milp(objective, integrality=np.ones(count),
                  bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_hot, 1, 1),
                               LinearConstraint(row[None], -np.inf,
                                                budget - offset)],
                  # the exact optimum, not HiGHS's default 0.01 % gap
                  options=dict(mip_rel_gap=0))
    if not result.success:
        raise ValueError(f'{kind} budget {budget:g}: the solver found no '
                         f'SubNet ({result.message}); feasible range '
                         f'[{lo:g}, {hi:g}]')
    choice = np.round(result.x).reshape(len(names), len(bits)).argmax(1)
    return {name: bits[c] for name, c in zip(names, choice)}


def pareto_sweep(traces, costs, bits, kind, budgets, fp_bytes: float = 0,
                 perturbations=None) -> List[dict]:
    """``search_subnet`` at each budget, with what each SubNet achieves."""
    rows = []
    names = list(costs)
    scores = layer_scores(traces, bits, perturbations)
    for budget in budgets:
        layer_bits = search_subnet(traces, costs, bits, kind, budget,
                                   fp_bytes, perturbations)
        row, offset = _cost_rows(names, costs, bits, kind, fp_bytes)
        x = np.zeros(len(row))
        for i, name in enumerate(names):
            x[i * len(bits) + list(bits).index(layer_bits[name])] = 1
        rows.append(dict(budget=budget, layer_bits=layer_bits,
                         achieved=float(row @ x + offset),
                         objective=sum(scores[n][b]
                                       for n, b in layer_bits.items())))
    return rows
