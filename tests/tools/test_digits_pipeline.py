"""The digits example through the real tools, on a subset of the data:
FP32 training, QAT, --resume, per-bit testing, integer export and DDP on
CPU (gloo). Each step is a subprocess, as a user runs it."""
import json
import os
import os.path as osp
import subprocess

import pytest
import torch

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)
from conftest import (DIGITS, ROOT, TOOLS, run_tool, tool_error,
                      write_digits_config)
from mmdrq.utils.tool_runs import evaluated_search

pytestmark = pytest.mark.slow  # trains through the tools


def test_qat_trains_and_validates_every_bit(qat_run):
    work, log = qat_run
    for bit in (8, 6, 4, 2):
        assert f'loss@w{bit}a{bit}' in log
        assert f'accuracy/top1@w{bit}a{bit}' in log
        assert f'w{bit}a{bit}_scale_lr' in log
    assert 'val metrics per bit-width' in log
    assert osp.exists(work / 'epoch_2.pth')


def test_resume_reaches_the_same_weights(digits, qat_run):
    work, _ = qat_run
    resumed = digits['folder'] / 'qat_resumed'
    # stop after epoch 1 of the same 2-epoch schedule, then resume
    run_tool(osp.join(TOOLS, 'train.py'), digits['qat_cfg'], '--work-dir',
             resumed, '--cfg-options', 'train_cfg.max_epochs=1')
    _, log = run_tool(osp.join(TOOLS, 'train.py'), digits['qat_cfg'],
                      '--work-dir', resumed, '--resume',
                      resumed / 'epoch_1.pth')
    assert 'resumed epoch: 1' in log
    # torch.load's default weights_only=True reads both checkpoints
    full = torch.load(work / 'epoch_2.pth', map_location='cpu')
    again = torch.load(resumed / 'epoch_2.pth', map_location='cpu')
    assert full['state_dict'].keys() == again['state_dict'].keys()
    for key, value in full['state_dict'].items():
        assert torch.equal(value, again['state_dict'][key]), key


def test_test_tool_reports_every_bit(digits, qat_run):
    work, _ = qat_run
    out = digits['folder'] / 'metrics.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), digits['qat_cfg'],
                      work / 'epoch_2.pth', '--work-dir',
                      digits['folder'] / 'test', '--out', out)
    metrics = json.loads(out.read_text())
    for bit in (8, 6, 4, 2):
        assert 0 <= metrics[f'accuracy/top1@w{bit}a{bit}'] <= 100
    assert '| w2a2 |' in log
    assert 'test_cfg.bits=5 is not one of the bits' in tool_error(
        'test', digits['qat_cfg'], work / 'epoch_2.pth', '--work-dir',
        digits['folder'] / 'test', '--bits', '5')


def test_test_tool_refuses_checkpoints_that_do_not_fit(digits, qat_run):
    """An FP32 checkpoint, or the {8,6,4,2} one tested as [4, 2], stops
    before the first test batch instead of giving a metric."""
    work, _ = qat_run
    for checkpoint, options, message in (
            (digits['fp_ckpt'], [], 'holds no quantizer state: an FP32 '
             'checkpoint'),
            (work / 'epoch_2.pth', ['--cfg-options',
                                    'model.quantizer.bits=[4,2]'],
             'was saved with bits=[8, 6, 4, 2], the model has bits=[4, 2]')):
        error = tool_error('test', digits['qat_cfg'], checkpoint,
                           '--work-dir', digits['folder'] / 'test_refused',
                           *options)
        assert message in error, error[-3000:]


class _Payload:
    """Unpickling it would create a folder: code run by the load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker, )


def test_test_tool_never_unpickles_code(digits, qat_run, tmp_path,
                                        monkeypatch):
    work, _ = qat_run
    checkpoint = torch.load(work / 'epoch_2.pth', map_location='cpu')
    marker = tmp_path / 'ran'
    checkpoint['meta']['note'] = _Payload(marker)
    torch.save(checkpoint, tmp_path / 'payload.pth')
    # turns torch's default weights_only=True off where none is passed
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    code, log = run_tool(osp.join(TOOLS, 'test.py'), digits['qat_cfg'],
                         tmp_path / 'payload.pth', '--work-dir',
                         tmp_path / 'work', expect_ok=False)
    assert code != 0 and 'holds objects that are not allowed' in log, \
        log[-3000:]
    assert not marker.exists()


def test_test_tool_checks_subnets_and_out_first(digits, qat_run, tmp_path):
    """A SubNet naming an unknown layer and an --out in a missing folder
    stop the run before the checkpoint is even read."""
    work, _ = qat_run
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps({'layer_bits': {'backbone.nope': 4}}))
    for options, message in (
            (['--subnets', bad], "bad.json': layer 'backbone.nope' is not "
             'a quantized layer'),
            (['--out', tmp_path / 'missing' / 'm.json'],
             'its folder does not exist')):
        error = tool_error('test', digits['qat_cfg'], work / 'epoch_2.pth',
                           '--work-dir', tmp_path / 'work', *options)
        assert message in error, error[-3000:]


def test_resume_with_other_bits_names_both(digits, qat_run):
    work, _ = qat_run
    error = tool_error('train', digits['qat_cfg'], '--work-dir',
                       digits['folder'] / 'resume_bits', '--resume',
                       work / 'epoch_1.pth', '--cfg-options',
                       'model.quantizer.bits=[4,2]')
    assert 'was saved with bits=[8, 6, 4, 2], the model has bits=[4, 2]' \
        in error, error[-3000:]


def test_export_int_reloads_bit_exact(digits, qat_run):
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmdrq.apis import build_model_from_config as build_quantized
    work, _ = qat_run
    out = digits['folder'] / 'int8.pth'
    _, log = run_tool(osp.join(TOOLS, 'export_int.py'), digits['qat_cfg'],
                      work / 'epoch_2.pth', out)
    assert 'wrote' in log
    cfg = Config.fromfile(digits['qat_cfg'])
    trained, _ = build_quantized(cfg)
    load_checkpoint(trained, str(work / 'epoch_2.pth'), map_location='cpu')
    loaded, arch = build_quantized(cfg)
    mmdrq.load_int(arch, str(out))
    x = torch.randn(3, 3, 16, 16)
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        for bit in (8, 6, 4, 2):
            with mmdrq.use_bits(trained, bit), mmdrq.use_bits(loaded, bit):
                assert torch.equal(trained(x), loaded(x))


def test_dist_train_on_cpu_with_gloo(digits):
    work = digits['folder'] / 'dist'
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1',
               PORT='29561')
    done = subprocess.run(
        ['bash', osp.join(TOOLS, 'dist_train.sh'), digits['qat_cfg'], '2',
         '--work-dir', str(work), '--cfg-options', 'train_cfg.max_epochs=1'],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert 'accuracy/top1@w2a2' in log
    assert osp.exists(work / 'epoch_1.pth')


def test_dist_train_with_pskd_on_cpu_with_gloo(digits):
    """PS-KD under DDP: the tables grow per rank without DDP broadcasting
    them, and every rank keeps every rank's predictions."""
    work = digits['folder'] / 'dist_pskd'
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1',
               PORT='29562')
    done = subprocess.run(
        ['bash', osp.join(TOOLS, 'dist_train.sh'), digits['qat_cfg'], '2',
         '--work-dir', str(work), '--cfg-options', 'train_cfg.max_epochs=1',
         'model.distill.alpha=0.7'],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    state = torch.load(work / 'epoch_1.pth', weights_only=False)
    seen = state['state_dict']['pskd.current_seen']
    # all 128 training images (write_config's indices), though each rank
    # ran only its half
    assert seen.all() and len(seen) == 128


def test_hasb_hook_switches_layers_after_warmup(digits):
    import re
    cfg = osp.join(digits['folder'], 'hasb.py')
    with open(cfg, 'w') as f:
        f.write(f"_base_ = {digits['qat_cfg']!r}\n"
                "custom_hooks = [dict(type='mmdrq.HASBHook', uniform=True, "
                "sigma=1.0, warmup_epochs=1)]\n"
                "train_cfg = dict(max_epochs=2, val_interval=2)\n")
    _, log = run_tool(osp.join(TOOLS, 'train.py'), cfg, '--work-dir',
                      digits['folder'] / 'hasb')
    epochs = {}
    for line in log.splitlines():
        match = re.search(r'Epoch\(train\)\s+\[(\d+)\].*avg_bit@w8a8: '
                          r'([\d.]+)', line)
        if match:
            epochs.setdefault(int(match.group(1)), []).append(
                float(match.group(2)))
    assert set(epochs) == {1, 2}
    assert all(v == 8.0 for v in epochs[1])  # warm-up: sigma 0
    assert all(v < 8.0 for v in epochs[2])  # sigma 1: uniform draws
    assert 'accuracy/top1@w2a2' in log


@pytest.fixture(scope='module')
def traces(digits, qat_run):
    work, _ = qat_run
    out = digits['folder'] / 'traces.json'
    _, log = run_tool(osp.join(TOOLS, 'hessian.py'), digits['qat_cfg'],
                      work / 'epoch_2.pth', '--out', out, '--num-samples',
                      '64', '--max-probes', '4')
    assert 'most sensitive layers' in log
    return out


def test_search_evaluates_subnets_without_retraining(digits, qat_run,
                                                     traces):
    work, _ = qat_run
    out_dir = digits['folder'] / 'search'
    _, log = run_tool(osp.join(TOOLS, 'search_subnet.py'), digits['qat_cfg'],
                      work / 'epoch_2.pth', '--kind', 'avg_bits', '--budgets',
                      '3', '5', '--calibration-samples', '32',
                      '--input-shape', '1', '3', '16', '16', '--work-dir',
                      out_dir)
    results = json.loads((out_dir / 'search.json').read_text())
    assert evaluated_search(out_dir) == results  # rewritten with metrics
    assert [s['name'] for s in results['subnets']] == [
        'subnet_avg_bits_3', 'subnet_avg_bits_5']
    for entry in results['subnets']:
        assert entry['avg_bits'] <= entry['budget'] + 1e-9
        assert 0 <= entry['accuracy/top1'] <= 100
    assert [u['name'] for u in results['uniform']] == [
        'w8a8', 'w6a6', 'w4a4', 'w2a2']
    assert osp.exists(out_dir / 'pareto_avg_bits.png')
    # the SubNet files go to tools/test.py and the integer export
    subnet = out_dir / 'subnet_avg_bits_3.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), digits['qat_cfg'],
                      work / 'epoch_2.pth', '--work-dir', out_dir,
                      '--bits', '8', '--subnets', subnet)
    assert 'accuracy/top1@subnet_avg_bits_3' in log
    run_tool(osp.join(TOOLS, 'export_int.py'), digits['qat_cfg'],
             work / 'epoch_2.pth', out_dir / 'subnet3.pth', '--subnet',
             subnet)
    # infeasible budget and a SubNet naming layers the model lacks
    error = tool_error('search_subnet', digits['qat_cfg'],
                       work / 'epoch_2.pth', '--budgets', '1', '--no-eval',
                       '--input-shape', '1', '3', '16', '16', '--work-dir',
                       out_dir)
    assert 'avg_bits budget 1 is infeasible' in error and '[2, 8]' in error
    # the default, measured: no traces; each layer's loss increase alone at
    # each bit on training images, saved, and the objective minus their
    # chosen sum
    increases = results['loss_increases']
    for entry in results['subnets']:
        assert entry['objective_kind'] == 'measured'
        assert set(increases) == set(entry['layer_bits'])
        assert entry['objective'] == pytest.approx(-sum(
            increases[n][str(b)] for n, b in entry['layer_bits'].items()))
    for layer, by_bit in increases.items():  # non-increasing in the bit
        assert by_bit['8'] == 0 and by_bit['8'] <= by_bit['6'] <= \
            by_bit['4'] <= by_bit['2'], layer
    assert set(results['measured_loss_increases']) == set(increases)
    # another budget kind from the same measurement (32 images; measuring
    # again would take the default 256)
    run_tool(osp.join(TOOLS, 'search_subnet.py'), digits['qat_cfg'],
             work / 'epoch_2.pth', '--increases', out_dir / 'search.json',
             '--kind', 'bitops', '--steps', '3', '--no-eval',
             '--input-shape', '1', '3', '16', '16', '--work-dir',
             out_dir / 'bitops')
    again = json.loads((out_dir / 'bitops' / 'search.json').read_text())
    assert again['kind'] == 'bitops' and len(again['subnets']) == 3
    assert again['measured_loss_increases'] == \
        results['measured_loss_increases']
    # with traces: HAWQ-V2's trace times the weight errors (< 0,
    # minimised) and the paper's trace * bits (> 0, maximised)
    for objective in ('perturbation', 'trace_bits'):
        run_tool(osp.join(TOOLS, 'search_subnet.py'), digits['qat_cfg'],
                 work / 'epoch_2.pth', '--traces', traces, '--budgets', '4',
                 '--objective', objective, '--no-eval', '--input-shape',
                 '1', '3', '16', '16', '--work-dir', out_dir / objective)
        entry = json.loads(
            (out_dir / objective / 'search.json').read_text())['subnets'][0]
        assert entry['objective_kind'] == objective
        assert entry['avg_bits'] <= 4 + 1e-9
        assert (entry['objective'] > 0) == (objective == 'trace_bits')
    bad = out_dir / 'bad.json'
    bad.write_text(json.dumps({'layer_bits': {'backbone.nope': 4}}))
    assert 'backbone.nope' in tool_error(
        'test', digits['qat_cfg'], work / 'epoch_2.pth', '--work-dir',
        out_dir, '--subnets', bad)


def test_mixed_precision_supernet_with_hasb(digits, qat_run, traces):
    import re
    work, _ = qat_run
    cfg = osp.join(digits['folder'], 'mp.py')
    with open(cfg, 'w') as f:
        f.write(f"_base_ = {digits['qat_cfg']!r}\n"
                "model = dict(transitional_bn=dict(input_shape=(1, 3, 16, "
                "16)))\n"
                f"load_from = {str(work / 'epoch_2.pth')!r}\n"
                f"custom_hooks = [dict(type='mmdrq.HASBHook', traces="
                f"{str(traces)!r}, sigma=1.0)]\n"
                "train_cfg = dict(max_epochs=1, val_interval=1)\n")
    _, log = run_tool(osp.join(TOOLS, 'train.py'), cfg, '--work-dir',
                      digits['folder'] / 'mp')
    assert 'TransitionalBatchNorm' in log and 'HASB:' in log
    averages = [float(v) for v in re.findall(r'avg_bit@w8a8: ([\d.]+)', log)]
    assert averages and all(v < 8.0 for v in averages)
    # a traces file of another model is refused
    other = digits['folder'] / 'other_traces.json'
    content = json.loads(traces.read_text())
    content['layers'].pop(next(iter(content['layers'])))
    other.write_text(json.dumps(content))
    assert 'another model' in tool_error(
        'train', cfg, '--work-dir', digits['folder'] / 'mp_bad',
        '--cfg-options', f'custom_hooks.0.traces={other}')


def test_compiled_training_through_the_runner(digits, qat_run):
    """model.compile=True through tools/train.py: trains every bit,
    validates, and saves a checkpoint with the plain run's keys."""
    work = digits['folder'] / 'qat_compiled'
    _, log = run_tool(osp.join(TOOLS, 'train.py'), digits['qat_cfg'],
                      '--work-dir', work, '--cfg-options',
                      'train_cfg.max_epochs=1', 'model.compile=True')
    assert 'runs the compiled architecture' in log
    for bit in (8, 6, 4, 2):
        assert f'loss@w{bit}a{bit}' in log
        assert f'accuracy/top1@w{bit}a{bit}' in log
    plain = torch.load(qat_run[0] / 'epoch_1.pth', map_location='cpu')
    compiled = torch.load(work / 'epoch_1.pth', map_location='cpu')
    assert compiled['state_dict'].keys() == plain['state_dict'].keys()


def test_measured_search_repeats_with_random_augmentation(digits, qat_run,
                                                          tmp_path):
    """The same command finds the same SubNets (and the same Hessian
    traces) although the training pipeline flips images at random: the
    calibration draws are seeded."""
    work, _ = qat_run
    cfg = write_digits_config(
        tmp_path, 'flip.py', osp.join(DIGITS, 'resnet_digits_drq_8642.py'),
        digits['data_root'],
        'train_dataloader = dict(batch_size=32, dataset=dict(\n'
        '    data_root=data_root, indices=64, pipeline=[\n'
        "        dict(type='LoadImageFromFile'),\n"
        "        dict(type='Resize', scale=(16, 16)),\n"
        "        dict(type='RandomFlip', prob=0.5, direction='horizontal'),\n"
        "        dict(type='PackInputs')]))\n")
    found, traces = [], []
    for run in ('first', 'again'):
        run_tool(osp.join(TOOLS, 'search_subnet.py'), cfg,
                 work / 'epoch_2.pth', '--budgets', '3', '5',
                 '--calibration-samples', '32', '--no-eval', '--input-shape',
                 '1', '3', '16', '16', '--work-dir', tmp_path / run)
        found.append(json.loads((tmp_path / run / 'search.json').read_text()))
        # tools/hessian.py's --seed likewise repeats its traces
        out = tmp_path / f'traces_{run}.json'
        run_tool(osp.join(TOOLS, 'hessian.py'), cfg, work / 'epoch_2.pth',
                 '--out', out, '--num-samples', '32', '--max-probes', '2',
                 '--min-probes', '2')
        traces.append(json.loads(out.read_text())['layers'])
    assert found[0]['measured_loss_increases'] == \
        found[1]['measured_loss_increases']
    assert [s['layer_bits'] for s in found[0]['subnets']] == \
        [s['layer_bits'] for s in found[1]['subnets']]
    assert traces[0] == traces[1]
