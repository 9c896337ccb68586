"""SubNet search as an integer linear program (scipy.optimize.milp;
docs/method.md, SubNet search).

One-hot binaries x[l, b] choose each layer's bit under one budget (average
bit-width, BitOps or model size, counted by ``mmdrq.search.counting``).
Budget modes:

- ``max``: the SubNet's cost is at most the budget.
- ``exact`` (the paper's equality): the cost equals the budget or, where no
  SubNet's cost does, is the cost nearest to it that a SubNet has (the
  lower one of two equally near). Costs are compared exactly: sums of bits
  (avg_bits), integer BitOps, weight bytes in eighths (size). For BitOps
  and size almost every SubNet has a cost of its own, so there the cost
  fixes the SubNet nearly alone and the objective only picks among SubNets
  of that same cost; ``max`` is the usual choice for them.

Objectives:

- ``trace_bits`` (the paper): maximise sum_l trace_l * bits_l, sensitive
  layers get more bits. Linear in the bits, so it picks extremes.
- ``perturbation`` (HAWQ-V2's criterion): minimise sum_l trace_l *
  ||Q_b(W_l) - W_l||^2, the loss increase a second-order expansion
  predicts; each layer's return on a bit diminishes, as its error does.
- ``measured``: minimise the sum of the chosen (layer, bit)s' loss
  increases measured with that layer alone at that bit
  (``sensitivity.loss_increases``): the ``perturbation`` objective with
  those increases as perturbations and every trace 1.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .counting import BUDGET_KINDS, subnet_cost

BUDGET_MODES = ('max', 'exact')
OBJECTIVES = ('trace_bits', 'perturbation', 'measured')
# budgets within this relative distance of the feasible range's ends count
# as inside (a range's end printed and typed back in, float noise)
RANGE_SLACK = 1e-9
# scores within this fraction of the largest score tie (HiGHS's own
# feasibility tolerance is 1e-6)
TIE = 1e-6


class _CostRow:
    """A SubNet's cost as ``(row @ x) / per + offset`` for the one-hot
    ``x[l * B + b]``: ``row`` holds counting's cost of each layer alone at
    each bit (integers, or eighths for size: exact in float64, so equal
    costs compare equal)."""

    def __init__(self, names, costs, bits, kind, fp_bytes):
        self.row = np.array([subnet_cost(kind, {n: b}, costs)
                             for n in names for b in bits], dtype=np.float64)
        self.per = len(names) if kind == 'avg_bits' else 1  # a mean
        self.offset = fp_bytes if kind == 'size' else 0.0

    def units(self, budget: float) -> float:
        """``budget`` in the row's units."""
        return (budget - self.offset) * self.per


def _check(traces, costs, bits, kind, budget_mode='max'):
    if kind not in BUDGET_KINDS:
        raise ValueError(f'budget kind {kind!r} is unknown; valid kinds: '
                         f'{list(BUDGET_KINDS)}')
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f'budget_mode {budget_mode!r} is unknown; valid: '
                         f'{list(BUDGET_MODES)}')
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
    return tuple(float(subnet_cost(kind, dict.fromkeys(costs, b), costs,
                                   fp_bytes)) for b in (min(bits), max(bits)))


def check_budgets(costs: Dict[str, dict], bits: Sequence[int], kind: str,
                  budgets: Sequence[float], fp_bytes: float = 0
                  ) -> Tuple[float, float]:
    """The feasible range, after checking that every budget is inside it
    (above it, ``max`` would silently give the all-highest model and
    ``exact`` could not be met): else an error that gives the range."""
    lo, hi = feasible_range(costs, bits, kind, fp_bytes)
    slack = RANGE_SLACK * max(abs(lo), abs(hi))
    for budget in budgets:
        if not lo - slack <= budget <= hi + slack:
            raise ValueError(f'{kind} budget {budget:g} is infeasible: the '
                             f'feasible range is [{lo:g}, {hi:g}]')
    return lo, hi


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


def _unit(gain: np.ndarray) -> np.ndarray:
    """``gain`` scaled to a largest magnitude of 1: HiGHS's absolute
    tolerances would blur tiny scores (traces times weight errors are often
    below 1e-6)."""
    return gain / max(np.abs(gain).max(), np.finfo(np.float64).tiny)


def _solve(gain: np.ndarray, num_layers: int, row: np.ndarray, lower: float,
           upper: float, at_least: Optional[Tuple[np.ndarray, float]] = None
           ) -> Optional[np.ndarray]:
    """The one-hot x maximising ``gain @ x`` with ``lower <= row @ x <=
    upper`` (and ``at_least``'s ``vector @ x >= value``, the vector of
    magnitude about 1), or None if there is none."""
    count = len(row)
    width = count // num_layers
    objective = -_unit(gain)
    one_hot = np.zeros((num_layers, count))
    for i in range(num_layers):
        one_hot[i, i * width:(i + 1) * width] = 1
    constraints = [LinearConstraint(one_hot, 1, 1),
                   LinearConstraint(row[None], lower, upper)]
    if at_least is not None:
        constraints.append(LinearConstraint(at_least[0][None], at_least[1],
                                            np.inf))
    result = milp(objective, integrality=np.ones(count),
                  bounds=Bounds(0, 1), constraints=constraints,
                  # the exact optimum, not HiGHS's default 0.01 % gap
                  options=dict(mip_rel_gap=0))
    return np.round(result.x) if result.success else None


def _spend_budget(x: np.ndarray, gain: np.ndarray, num_layers: int,
                  row: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """Of the SubNets scoring as well as ``x`` (to TIE of the largest
    score), the one of the highest cost under the budget: a bit whose score
    is no worse is taken rather than left unspent (measured increases are
    0 at several bits of many layers, and the solver is indifferent
    there: at budget 7 of {8,6,4,2} FCOS it used 6.3 average bits)."""
    unit = _unit(gain)
    best = _solve(row, num_layers, row, lower, upper,
                  at_least=(unit, unit @ x - TIE))
    return x if best is None else best


def _nearest_cost(row: np.ndarray, num_layers: int, target: float) -> float:
    """The cost (row units) nearest ``target`` that a SubNet has; of two
    equally near, the lower. ``target`` is inside the feasible range, so
    both neighbours exist."""
    slack = RANGE_SLACK * abs(target)
    below = row @ _solve(row, num_layers, row, -np.inf, target + slack)
    above = row @ _solve(-row, num_layers, row, target - slack, np.inf)
    return below if target - below <= above - target else above


def search_subnet(traces: Dict[str, float], costs: Dict[str, dict],
                  bits: Sequence[int], kind: str, budget: float,
                  fp_bytes: float = 0, perturbations=None,
                  budget_mode: str = 'max') -> Dict[str, int]:
    """Per-layer bits with the best ``layer_scores`` (``trace * bits``
    unless ``perturbations`` are given) at cost <= ``budget``
    (``budget_mode='max'``) or at the cost nearest ``budget`` (``'exact'``,
    see the module's docstring). A budget outside ``feasible_range`` is an
    error."""
    _check(traces, costs, bits, kind, budget_mode)
    lo, hi = check_budgets(costs, bits, kind, [budget], fp_bytes)
    budget = min(max(budget, lo), hi)  # a range end, give or take noise
    names, bits = list(costs), list(bits)
    scores = layer_scores(traces, bits, perturbations)
    gain = np.array([scores[n][b] for n in names for b in bits],
                    dtype=np.float64)
    cost = _CostRow(names, costs, bits, kind, fp_bytes)
    target = cost.units(budget)
    if budget_mode == 'max':
        lower, upper = -np.inf, target + RANGE_SLACK * abs(target)
    else:
        nearest = _nearest_cost(cost.row, len(names), target)
        # costs are integers or eighths: only ``nearest`` lies within 1/16
        lower, upper = nearest - 1 / 16, nearest + 1 / 16
    x = _solve(gain, len(names), cost.row, lower, upper)
    if x is None:
        raise ValueError(f'{kind} budget {budget:g}: the solver found no '
                         f'SubNet; feasible range [{lo:g}, {hi:g}]')
    if budget_mode == 'max':
        x = _spend_budget(x, gain, len(names), cost.row, lower, upper)
    choice = x.reshape(len(names), len(bits)).argmax(1)
    return {name: bits[c] for name, c in zip(names, choice)}


def pareto_sweep(traces, costs, bits, kind, budgets, fp_bytes: float = 0,
                 perturbations=None, budget_mode: str = 'max'
                 ) -> List[dict]:
    """``search_subnet`` at each budget (all checked first), with each
    SubNet's cost (``achieved``) and objective."""
    _check(traces, costs, bits, kind, budget_mode)
    check_budgets(costs, bits, kind, budgets, fp_bytes)
    scores = layer_scores(traces, bits, perturbations)
    rows = []
    for budget in budgets:
        layer_bits = search_subnet(traces, costs, bits, kind, budget,
                                   fp_bytes, perturbations, budget_mode)
        rows.append(dict(budget=budget, layer_bits=layer_bits,
                         achieved=subnet_cost(kind, layer_bits, costs,
                                              fp_bytes),
                         objective=sum(scores[n][b]
                                       for n, b in layer_bits.items())))
    return rows
