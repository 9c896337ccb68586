"""Cheaper schedules of the multi-precision step: which bits train in an
iteration, the same on every rank and on resume, and only those bits' steps
and BN copies move."""
from collections import Counter

import pytest
import torch
from mmengine.logging import MessageHub

from mmdrq.models import MultiPrecisionQAT
from mmdrq.models.bit_schedule import BitSchedule, build_bit_schedule
from conftest import CountingWrapper, classifier_batch

BITS = (8, 6, 4, 2)


def test_every_bit_by_default():
    schedule = build_bit_schedule(BITS, None)
    assert all(schedule.bits_at(i, 10) == BITS for i in range(10))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_sandwich_keeps_the_ends_and_draws_the_middle(seed):
    schedule = BitSchedule(BITS, 'sandwich', seed=seed)
    picks = [schedule.bits_at(i, 400) for i in range(400)]
    assert all(p[0] == 8 and p[-1] == 2 and len(p) == 3 for p in picks)
    middle = Counter(p[1] for p in picks)
    assert set(middle) == {6, 4} and min(middle.values()) > 150
    # the same iteration draws the same bits (every rank, a resumed run)
    again = BitSchedule(BITS, 'sandwich', seed=seed)
    assert [again.bits_at(i, 400) for i in range(400)] == picks


def test_random_keeps_the_highest_and_weighs_lagging_bits():
    uniform = BitSchedule(BITS, 'random', num_sampled=2)
    picks = [uniform.bits_at(i, 300) for i in range(300)]
    assert all(p[0] == 8 and len(p) == 3 for p in picks)
    assert set(b for p in picks for b in p[1:]) == {6, 4, 2}
    weighted = BitSchedule(BITS, 'random', weights='loss')
    weighted.record({b: torch.tensor(v) for b, v in
                     {8: 1.0, 6: 1.0, 4: 1.0, 2: 8.0}.items()})
    drawn = Counter(weighted.bits_at(i, 1000)[1] for i in range(1000))
    # probability 8 / 10 for the 2-bit loss against 1 / 10 for the others
    assert 720 < drawn[2] < 880 and drawn[6] + drawn[4] == 1000 - drawn[2]


def test_progressive_joins_from_the_highest():
    schedule = BitSchedule(BITS, 'progressive', join_until=0.6)
    joined = [schedule.bits_at(i, 100) for i in range(100)]
    assert joined[0] == (8, ) and joined[19] == (8, )
    assert joined[20] == (8, 6) and joined[40] == (8, 6, 4)
    assert joined[60] == BITS and joined[99] == BITS


@pytest.mark.parametrize('cfg, message', [
    (dict(kind='sandwhich'), 'bit_schedule.kind must be one of'),
    (dict(kind='sandwich', num_sampled=3), 'num_sampled must be at most 2'),
    (dict(kind='sandwich', weights='loss'), "needs kind='random'"),
    (dict(num_sample=1), r"unknown key\(s\) \['num_sample'\]"),
    ('sandwich', 'bit_schedule must be a dict'),
    (dict(kind='progressive', join_until=1.5), 'join_until must be'),
    (dict(kind='random', seed=-1), 'bit_schedule.seed must be an int'),
])
def test_bad_schedules_are_named(small_classifier, cfg, message):
    with pytest.raises(ValueError, match=message):
        MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)),
                          bit_schedule=cfg)


def _bn_steps(model, bit):
    norm = model.architecture.backbone.layer1[0].bn1
    return int(norm.bns[str(bit)].num_batches_tracked)


def test_only_the_scheduled_bits_step(small_classifier):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)),
                              bit_schedule=dict(kind='sandwich', seed=3))
    wrapper = CountingWrapper(torch.optim.SGD(model.parameters(), 0.01),
                              model)
    hub = MessageHub.get_current_instance()
    hub.update_info('max_iters', 20)
    expected = []
    for iteration in range(3):
        hub.update_info('iter', iteration)
        log_vars = model.train_step(classifier_batch(), wrapper)
        bits = model.bit_schedule.bits_at(iteration, 20)
        expected += list(bits)
        assert all(f'loss@w{b}a{b}' in log_vars for b in bits)
        assert not any(f'loss@w{b}a{b}' in log_vars
                       for b in set(BITS) - set(bits))
    assert wrapper.step_bits == expected  # one step per scheduled bit
    steps = Counter(expected)
    assert model.bit_schedule.steps == steps
    for bit in BITS:  # an unscheduled bit's BN copy saw no batch
        assert _bn_steps(model, bit) == steps[bit]
