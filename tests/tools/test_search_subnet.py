"""tools/search_subnet.py on the digits model (untrained weights, random
traces, ``--no-eval``): budget modes and the errors that come before any
work. The trained pipeline runs in test_digits_pipeline.py."""
import json
import os.path as osp

import pytest
import torch

from conftest import ROOT, TOOLS, run_tool, tool_error
from mmdrq.utils.tool_runs import evaluated_search

QAT_CFG = osp.join(ROOT, 'configs', 'classification', 'digits',
                   'resnet_digits_drq_8642.py')
SEARCH = osp.join(TOOLS, 'search_subnet.py')


@pytest.fixture(scope='module')
def model_files(tmp_path_factory):
    """A checkpoint of the freshly built QAT model and traces for it."""
    from mmengine.config import Config

    from mmdrq.search.hessian import quantized_weights, save_traces
    from mmdrq.apis import build_model_from_config
    folder = tmp_path_factory.mktemp('search_tool')
    model, _ = build_model_from_config(Config.fromfile(QAT_CFG))
    checkpoint = folder / 'model.pth'
    torch.save(dict(state_dict=model.state_dict()), checkpoint)
    g = torch.Generator().manual_seed(0)
    names = list(quantized_weights(model))
    traces = {n: dict(trace_per_param=float(torch.rand((), generator=g)))
              for n in names}
    save_traces(folder / 'traces.json', traces, {}, model)
    return folder, checkpoint, folder / 'traces.json', len(names)


def search(model_files, work_dir, *args):
    _, checkpoint, traces, _ = model_files
    return run_tool(SEARCH, QAT_CFG, checkpoint, '--objective',
                    'perturbation', '--traces', traces, '--no-eval',
                    '--work-dir', work_dir, *args)


def test_exact_budget_mode(model_files, tmp_path):
    """An average of 5 bits over the digits ResNet's layers: ``exact`` gives
    the sum of bits nearest 5 L ({8,6,4,2}: even sums; the lower of two
    equally near), ``max`` at most 5."""
    layers = model_files[3]
    target = 5 * layers
    nearest = target if target % 2 == 0 else target - 1
    for mode in ('exact', 'max'):
        search(model_files, tmp_path / mode, '--budgets', '5', '4.5',
               '--budget-mode', mode, '--input-shape', '1', '3', '16', '16')
        results = json.loads((tmp_path / mode / 'search.json').read_text())
        assert results['budget_mode'] == mode
        # a search without its evaluation is not taken for a finished one
        assert 'metrics' not in results
        assert evaluated_search(tmp_path / mode) is None
        entry = results['subnets'][0]
        assert entry['budget_mode'] == mode
        assert entry == json.loads(
            (tmp_path / mode / 'subnet_avg_bits_5.json').read_text())
        if mode == 'exact':
            assert sum(entry['layer_bits'].values()) == nearest
        else:
            assert entry['avg_bits'] <= 5
        assert [s['budget'] for s in results['subnets']] == [5, 4.5]


def test_bad_budgets_steps_and_input_shape_fail_before_any_output(
        model_files, tmp_path):
    _, checkpoint, traces, _ = model_files

    def error(*args):  # in-process: each stops before any work
        return tool_error('search_subnet', QAT_CFG, checkpoint, '--objective',
                          'perturbation', '--traces', traces, '--no-eval',
                          '--work-dir', tmp_path, *args)
    # above the range: max used to write the all-8-bit model for it
    assert 'avg_bits budget 10 is infeasible: the feasible range is ' \
        '[2, 8]' in error('--budgets', '4', '10', '--input-shape', '1', '3',
                          '16', '16')
    # traces go with the trace objectives only
    assert '--objective trace_bits needs --traces' in tool_error(
        'search_subnet', QAT_CFG, checkpoint, '--objective', 'trace_bits',
        '--no-eval')
    without = tool_error('search_subnet', QAT_CFG, checkpoint, '--traces',
                         traces, '--no-eval')
    assert '--traces: the measured objective (the default) takes none' in \
        without and '--objective perturbation or trace_bits' in without
    assert '--calibration-samples must be at least 1, got 0' in tool_error(
        'search_subnet', QAT_CFG, checkpoint, '--calibration-samples', '0')
    # used to be ignored silently by the trace objectives
    assert '--calibration-samples: only the measured objective measuring ' \
        'afresh takes it, not --objective perturbation' in error(
            '--calibration-samples', '64')
    assert '--seed: only the measured objective measuring afresh takes ' \
        'it, not --objective perturbation' in error('--seed', '1')
    assert '--increases: only the measured objective takes them, not ' \
        '--objective perturbation' in error('--increases', traces)
    # used to write an empty search.json and exit 0
    assert '--steps must be at least 1, got 0' in error('--steps', '0')
    # used to fail inside the first conv
    assert '--input-shape 1 1 16 16 has 1 channels; the model expects 3' \
        in error('--input-shape', '1', '1', '16', '16')
    assert not list(tmp_path.iterdir())


def test_increases_of_another_checkpoint_or_model_are_refused(model_files,
                                                             tmp_path):
    folder, checkpoint, _, _ = model_files
    names = list(json.loads((folder / 'traces.json').read_text())['layers'])
    increases = {n: {'8': 0.0, '6': 0.1, '4': 0.2, '2': 0.3} for n in names}

    def error(content):
        path = tmp_path / 'search.json'
        path.write_text(json.dumps(content))
        return tool_error('search_subnet', QAT_CFG, checkpoint, '--increases',
                          path, '--no-eval', '--input-shape', '1', '3', '16',
                          '16', '--work-dir', tmp_path / 'out')
    assert 'holds no measured_loss_increases' in error({'subnets': []})
    assert f"was measured on checkpoint '/elsewhere/model.pth', not " \
        f"'{osp.realpath(checkpoint)}'" in error(dict(
            checkpoint='/elsewhere/model.pth',
            measured_loss_increases=increases))
    ours = str(osp.realpath(checkpoint))
    del increases[names[0]]
    assert "does not match this model's quantized layers and bits (e.g. " \
        f"['{names[0]}'])" in error(dict(checkpoint=ours,
                                        measured_loss_increases=increases))
    increases[names[0]] = {'8': 0.0, 'six': 1.0}
    assert 'measured_loss_increases must map each layer to {bit: number}' \
        in error(dict(checkpoint=ours, measured_loss_increases=increases))
    assert not (tmp_path / 'out').exists()
