"""FreezeBNStatsHook on MMEngine's real Runner around the QAT wrapper of a
real mmpretrain classifier: every bit's BN copies update their running
statistics before ``begin`` (or their bit's ``bit_begin``) and never after,
also across a validation (which sets the model back to train mode), while
their affine parameters learn."""
import pytest
import torch
from mmengine.hooks import Hook
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.engine import FreezeBNStatsHook
from mmdrq.models import MultiPrecisionQAT

from conftest import build_iter_runner as build_runner


class RecordBN(Hook):
    """Each BN's running mean, batch count and weight after every iteration."""

    def __init__(self):
        self.steps = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        self.steps.append({
            name: (m.running_mean.clone(), int(m.num_batches_tracked),
                   m.weight.detach().clone())
            for name, m in runner.model.named_modules()
            if isinstance(m, _BatchNorm)})


def test_statistics_freeze_at_begin_affine_keeps_learning(
        tmp_path, small_classifier):
    torch.manual_seed(0)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    record = RecordBN()
    build_runner(tmp_path, model,
                 [FreezeBNStatsHook(begin=2), record]).train()
    assert len(record.steps) == 4
    names = list(record.steps[0])
    # every bit's copy of every switchable BN
    assert any('.bns.8' in n for n in names) and \
        any('.bns.4' in n for n in names)
    for name in names:
        mean, count, weight = zip(*(step[name] for step in record.steps))
        # one batch per bit per iteration before begin, none from begin on
        assert count[1] - count[0] == 1 and count[3] == count[1]
        assert not torch.equal(mean[0], mean[1])
        torch.testing.assert_close(mean[3], mean[1], rtol=0, atol=0)
    # the affine parameters still learn while the statistics are frozen
    assert any(not torch.equal(step_1, step_3) for step_1, step_3 in zip(
        (record.steps[1][n][2] for n in names),
        (record.steps[3][n][2] for n in names)))


def test_bit_begin_freezes_that_bits_copies_later(tmp_path,
                                                  small_classifier):
    torch.manual_seed(0)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    record = RecordBN()
    # a digit string, as --cfg-options gives the key
    build_runner(tmp_path, model, [
        FreezeBNStatsHook(begin=1, bit_begin={'4': 3}), record]).train()
    counts = {name: [step[name][1] for step in record.steps]
              for name in record.steps[0]}
    eights = [c for n, c in counts.items() if '.bns.8.' in n + '.']
    fours = [c for n, c in counts.items() if '.bns.4.' in n + '.']
    assert eights and fours
    # 8-bit copies: a batch at iteration 0 only; 4-bit ones at 0, 1 and 2
    assert all(c == [c[0]] * 4 for c in eights)
    assert all(c[1:] == [c[0] + 1, c[0] + 2, c[0] + 2] for c in fours)


@pytest.mark.parametrize('begin', [-1, 1.5, True, '0'])
def test_bad_begin_names_the_value(begin):
    with pytest.raises(ValueError, match=f'begin must be an int >= 0, got '
                       f'{begin!r}'):
        FreezeBNStatsHook(begin=begin)
    with pytest.raises(ValueError, match=r"bit_begin\[4\] must be an int "
                       f'>= 0, got {begin!r}'):
        FreezeBNStatsHook(bit_begin={4: begin})


@pytest.mark.parametrize('bit_begin, message', [
    ({3: 1}, r'bit_begin key=3 is not one of the bits \[8, 4\]'),
    ({4: 4}, r'bit_begin\[4\]=4 is not before the end of training'),
    ('2:1', "bit_begin must be a dict {bit: iteration}, got '2:1'"),
])
def test_bad_bit_begin_fails_before_training(tmp_path, small_classifier,
                                             bit_begin, message):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    record = RecordBN()
    with pytest.raises(ValueError, match=message):
        build_runner(tmp_path, model, [FreezeBNStatsHook(
            bit_begin=bit_begin), record]).train()
    assert record.steps == []


def test_bit_begin_needs_bn_copies(tmp_path, small_classifier):
    with pytest.raises(ValueError, match=r'bit_begin=\{2: 1\} needs per-bit '
                       'BN copies .* ImageClassifier has none'):
        build_runner(tmp_path, small_classifier(), [
            FreezeBNStatsHook(bit_begin={2: 1})], validate=False).train()


def test_begin_at_the_end_fails_before_training(tmp_path, small_classifier):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4]))
    record = RecordBN()
    runner = build_runner(tmp_path, model,
                          [FreezeBNStatsHook(begin=4), record])
    with pytest.raises(ValueError, match=r'begin=4 is not before the end of '
                       r'training \(max_iters=4\)'):
        runner.train()
    assert record.steps == []
