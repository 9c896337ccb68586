"""``required_metric`` of the multi-bit loops: a name the evaluator does
not give stops the run after the first setting (not after every bit), with
the key, the name and the metrics there are; a given one runs every bit."""
import pytest

from conftest import build_iter_runner
from mmdrq.models import MultiPrecisionQAT


def runner_with(tmp_path, small_classifier, required_metric):
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4, 2]))
    return build_iter_runner(
        tmp_path, model, [], val_cfg=dict(type='mmdrq.MultiBitValLoop',
                                          required_metric=required_metric))


def test_misspelt_metric_stops_after_the_first_bit(tmp_path,
                                                   small_classifier):
    runner = runner_with(tmp_path, small_classifier, 'accuracy/top5')
    evaluated = []
    runner.val_loop.evaluator.evaluate = \
        lambda size, original=runner.val_loop.evaluator.evaluate: \
        evaluated.append(size) or original(size)
    with pytest.raises(ValueError, match=r"val_cfg.required_metric="
                       r"'accuracy/top5' is not a metric of this "
                       r"evaluation: \['accuracy/top1'\]"):
        runner.val()
    assert len(evaluated) == 1  # of three bits


def test_given_metric_runs_every_bit(tmp_path, small_classifier):
    metrics = runner_with(tmp_path, small_classifier, 'accuracy/top1').val()
    assert sorted(metrics) == ['accuracy/top1@w2a2', 'accuracy/top1@w4a4',
                               'accuracy/top1@w8a8']


@pytest.mark.parametrize('value', ['', 5])
def test_required_metric_must_be_a_name(tmp_path, small_classifier, value):
    runner = runner_with(tmp_path, small_classifier, value)
    with pytest.raises(ValueError, match=r'val_cfg.required_metric must be '
                       r'a metric name such as accuracy/top1, got ' +
                       repr(value)):
        runner.val_loop
