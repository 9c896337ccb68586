"""Which bits train in an iteration of one-shot multi-precision QAT.

The paper trains every bit every iteration (``kind='all'``), so an
iteration costs one step per bit. The cheaper schedules (a deviation from
the paper; their measured effect: docs/training.md, Cheaper schedules):

* ``sandwich``: the highest and the lowest bit every iteration, and
  ``num_sampled`` of the bits between them, drawn uniformly (the
  slimmable networks' sandwich rule);
* ``random``: the highest bit every iteration (the teacher of head
  distillation and PS-KD, and the bit a loaded model starts at) and
  ``num_sampled`` of the others, drawn uniformly, or with
  ``weights='loss'`` in proportion to each bit's running mean loss, so the
  bits that lag train more often;
* ``progressive``: bits join from the highest down; the i-th of n trains
  from ``i / (n - 1) * join_until`` of the run on.

Draws come from a generator seeded by the iteration, so every DDP rank and a
resumed run draw the same bits (the running losses are averaged over ranks
first; a resumed run starts them afresh). Each bit's step is its own, so
ALRS gives it its own scale rate whatever the schedule; ``steps`` counts
each bit's steps, also kept in the Runner's runtime info
(``bit_schedule_steps``, saved in every checkpoint's ``message_hub``).
"""
import inspect
import random
from collections import Counter
from typing import Dict, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_reduce
from mmengine.logging import MessageHub

from mmdrq.utils.checks import check_choice, check_int, check_number

KINDS = ('all', 'sandwich', 'random', 'progressive')
WEIGHTS = ('uniform', 'loss')


class BitSchedule:
    """Picks the bits of each training iteration (module docstring).

    Args:
        bits: the model's bit-widths, highest first.
        kind: one of ``KINDS``.
        num_sampled: bits drawn per iteration (``sandwich``: among the
            middle ones; ``random``: among all but the highest).
        weights: ``uniform`` or ``loss`` (``random`` only).
        join_until: fraction of the run by which the last bit has joined
            (``progressive``).
        seed: base seed of the draws.
    """

    def __init__(self, bits: Sequence[int], kind: str = 'all',
                 num_sampled: int = 1, weights: str = 'uniform',
                 join_until: float = 0.5, seed: int = 0):
        self.bits = tuple(bits)
        self.kind = check_choice('bit_schedule.kind', kind, KINDS)
        self.weights = check_choice('bit_schedule.weights', weights, WEIGHTS)
        if weights == 'loss' and kind != 'random':
            raise ValueError("bit_schedule.weights='loss' needs "
                             f"kind='random', got kind={kind!r}")
        pool = len(self.bits) - (2 if kind == 'sandwich' else 1)
        self.num_sampled = check_int('bit_schedule.num_sampled', num_sampled,
                                     minimum=0)
        if kind in ('sandwich', 'random') and num_sampled > max(pool, 0):
            raise ValueError(
                f'bit_schedule.num_sampled must be at most {max(pool, 0)} '
                f'for kind={kind!r} with bits={list(self.bits)}, got '
                f'{num_sampled!r}')
        self.join_until = check_number('bit_schedule.join_until', join_until,
                                       0.0, 1.0)
        self.seed = check_int('bit_schedule.seed', seed)
        self.steps = Counter()  # bit -> steps trained (this process)
        self.mean_loss: Dict[int, float] = {}

    def bits_at(self, iteration: int, max_iters: int) -> Tuple[int, ...]:
        """The bits of ``iteration`` (0-based) of a ``max_iters`` run,
        highest first."""
        if self.kind == 'all':
            return self.bits
        if self.kind == 'progressive':
            n = len(self.bits)
            progress = iteration / max(max_iters, 1)
            return tuple(b for i, b in enumerate(self.bits)
                         if n == 1 or progress >= i / (n - 1) *
                         self.join_until)
        draw = random.Random(self.seed * 1_000_003 + iteration)
        if self.kind == 'sandwich':
            fixed, pool = (self.bits[0], self.bits[-1]), self.bits[1:-1]
        else:
            fixed, pool = (self.bits[0], ), self.bits[1:]
        if self.weights == 'loss':
            picked = _weighted_sample(draw, pool, [
                self.mean_loss.get(b, max(self.mean_loss.values(),
                                          default=1.0)) for b in pool],
                self.num_sampled)
        else:
            picked = draw.sample(pool, self.num_sampled)
        chosen = set(fixed) | set(picked)
        return tuple(b for b in self.bits if b in chosen)

    def current_bits(self) -> Tuple[int, ...]:
        """The bits of the Runner's current iteration (MessageHub's ``iter``
        and ``max_iters``; all bits outside a Runner)."""
        hub = MessageHub.get_current_instance()
        iteration = hub.get_info('iter')
        if self.kind == 'all' or iteration is None:
            return self.bits
        return self.bits_at(iteration, hub.get_info('max_iters') or 1)

    def record(self, losses: Dict[int, torch.Tensor],
               momentum: float = 0.9):
        """Count the steps of one iteration and, for ``weights='loss'``,
        fold its per-bit losses (averaged over ranks, so that every rank
        draws alike) into the running means."""
        self.steps.update(losses.keys())
        # the Runner saves runtime info in every checkpoint: how many steps
        # each bit got is read back from there
        MessageHub.get_current_instance().update_info(
            'bit_schedule_steps', {int(b): n for b, n in self.steps.items()})
        if self.weights != 'loss' or not losses:
            return
        bits = sorted(losses)
        values = torch.stack([losses[b].detach().double() for b in bits])
        all_reduce(values, op='mean')
        for bit, loss in zip(bits, values.tolist()):
            old = self.mean_loss.get(bit)
            self.mean_loss[bit] = loss if old is None else \
                momentum * old + (1 - momentum) * loss


def _weighted_sample(draw: random.Random, pool, weights, k: int) -> list:
    """``k`` distinct items of ``pool``, each draw in proportion to
    ``weights`` among the items left."""
    pool, weights, picked = list(pool), [max(w, 1e-12) for w in weights], []
    for _ in range(k):
        index = draw.choices(range(len(pool)), weights=weights)[0]
        picked.append(pool.pop(index))
        weights.pop(index)
    return picked


def build_bit_schedule(bits: Sequence[int],
                       cfg: Optional[dict]) -> BitSchedule:
    """``BitSchedule(bits, **cfg)``; None is the paper's every-bit
    schedule. Unknown keys are named before any work."""
    cfg = dict(kind='all') if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f'bit_schedule must be a dict such as '
                         f"dict(kind='sandwich'), got {cfg!r}")
    known = list(inspect.signature(BitSchedule).parameters)[1:]
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ValueError(f'bit_schedule has unknown key(s) {unknown}; '
                         f'known: {known}')
    return BitSchedule(bits, **cfg)
