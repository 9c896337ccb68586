"""A new user's mistakes, round 4 (issue 25's second campaign): outputs that
would replace an input or a user's files, damaged and wrong checkpoints in
every tool, empty or repeated bit choices, and messages that name the file
or key. Each runs the tool's main in this process (``tool_error``) and
checks that nothing was written or replaced."""
import json
import os
import os.path as osp
import re
import shutil

import pytest
import torch

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)

from conftest import (DIGITS, TOOLS, build_small_classifier, run_tool,
                      tool_error)

pytestmark = pytest.mark.slow  # the session's digits QAT run

QAT_CONFIG = osp.join(DIGITS, 'resnet_digits_drq_8642.py')


@pytest.fixture(scope='module')
def files(digits, qat_run, tmp_path_factory):
    """A trained checkpoint, its integer file, a damaged copy (one weight's
    bytes flipped: torch loads it without complaint) and a truncated one."""
    folder = tmp_path_factory.mktemp('wrong_inputs')
    ckpt = str(qat_run[0] / 'epoch_2.pth')
    int_path = str(folder / 'int8.pth')
    run_tool(osp.join(TOOLS, 'export_int.py'), digits['qat_cfg'], ckpt,
             int_path)
    state = torch.load(ckpt, weights_only=True)['state_dict']
    key = 'architecture.head.fc.weight'
    weight = state[key].numpy().tobytes()
    data = open(ckpt, 'rb').read()
    assert data.count(weight) == 1
    damaged = folder / 'damaged.pth'
    damaged.write_bytes(data.replace(weight, bytes(b ^ 0x40 for b in weight)))
    truncated = folder / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    return dict(folder=folder, cfg=digits['qat_cfg'], ckpt=ckpt,
                int_path=int_path, damaged=str(damaged),
                truncated=str(truncated), key=key,
                data_root=digits['data_root'])


def _unchanged(path, before):
    with open(path, 'rb') as f:
        return f.read() == before


def test_outputs_that_are_the_input_are_refused(files, tmp_path):
    copy = tmp_path / 'ckpt.pth'
    shutil.copy(files['ckpt'], copy)
    before = copy.read_bytes()
    for tool, argv in (
            ('test', [files['cfg'], copy, '--out', copy]),
            ('hessian', [files['cfg'], copy, '--out', copy])):
        error = tool_error(tool, *argv)
        assert 'FileExistsError' in error and 'is the input' in error, error
        assert _unchanged(copy, before)
    error = tool_error('hessian', files['cfg'], copy, '--out', tmp_path)
    assert 'IsADirectoryError' in error and 'is a folder' in error


def test_damaged_checkpoints_are_refused_by_every_tool(files, tmp_path):
    expected = f"tensor '{files['key']}' does not match the SHA-256"
    traces = tmp_path / 'traces.json'
    for tool, argv in (
            ('export_int', [files['damaged'], tmp_path / 'int.pth']),
            ('export_onnx', [files['damaged'], '--out-dir', tmp_path / 'o',
                             '--input-shape', 1, 3, 16, 16]),
            ('hessian', [files['damaged'], '--out', traces]),
            ('search_subnet', [files['damaged'], '--input-shape', 1, 3, 16,
                               16, '--budgets', 5, '--no-eval'])):
        error = tool_error(tool, files['cfg'], *argv)
        assert expected in error, (tool, error)
    assert os.listdir(tmp_path) == []


def test_unreadable_checkpoints_are_named(files, tmp_path):
    for checkpoint, message in (
            (files['truncated'], 'truncated.pth.*truncated or corrupt'),
            (files['folder'], 'is a folder, not a checkpoint file'),
            (files['int_path'], 'an mmdrq integer file.*exported already')):
        error = tool_error('export_int', files['cfg'], checkpoint,
                           tmp_path / 'int.pth')
        assert re.search(message, error), error
    from mmdrq.utils import load_weights_only
    with pytest.raises(ValueError, match='truncated.pth.*truncated or'):
        load_weights_only(files['truncated'])


def test_training_refuses_wrong_starts_before_work(files, tmp_path):
    """An integer file, a checkpoint of another model, and a save_best of
    a bit the run does not validate: errors before the first iteration."""
    work = tmp_path / 'work'
    error = tool_error('train', files['cfg'], '--work-dir', work,
                       '--cfg-options', f'load_from={files["int_path"]}')
    assert 'an mmdrq integer file' in error and 'QAT starts from' in error
    error = tool_error('train', files['cfg'], '--work-dir', work,
                       '--cfg-options', 'model.quantizer.bits=[8,4]',
                       'load_from=None')
    assert "save_best='accuracy/top1@w2a2'" in error and "'w8a8'" in error
    error = tool_error('train', files['cfg'], '--work-dir', work,
                       '--cfg-options', 'val_cfg.bits=[]', 'load_from=None')
    assert 'val_cfg.bits=[] and no subnets' in error
    assert not any(name.endswith('.pth') for _, _, names in os.walk(work)
                   for name in names)


def test_start_checkpoint_of_another_model_is_refused():
    """MMEngine's loose load_from would train from partly random weights."""
    from mmengine.runner.checkpoint import load_state_dict

    from mmdrq.models import MultiPrecisionQAT
    model = MultiPrecisionQAT(build_small_classifier(), dict(bits=[8, 4]))
    other = build_small_classifier()
    other.head.fc = torch.nn.Linear(64, 5)  # another head
    with pytest.raises(ValueError, match=r'other shapes.*head\.fc\.weight'):
        load_state_dict(model, other.state_dict())
    extra = dict(build_small_classifier().state_dict(),
                 **{'neck.extra.weight': torch.zeros(3)})
    with pytest.raises(ValueError, match="keys the model does not have"):
        load_state_dict(model, extra)
    # the model's own FP32 start still loads, as before
    load_state_dict(model, build_small_classifier().state_dict())


def test_export_checks_bits_and_channels_first(files, tmp_path):
    out = tmp_path / 'onnx'
    error = tool_error('export_onnx', files['cfg'], files['int_path'],
                       '--out-dir', out, '--bits', 8, 8)
    assert '[8, 8] holds a bit twice' in error
    error = tool_error('export_onnx', files['cfg'], files['int_path'],
                       '--out-dir', out, '--input-shape', 1, 1, 16, 16)
    assert 'has 1 channels; the model expects 3' in error
    assert not out.exists()


def test_messages_name_the_file_or_key(files, tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text(f'_base_ = {QAT_CONFIG!r}\nmodel = dict(\n')
    error = tool_error('test', broken, files['ckpt'])
    assert 'broken.py' in error and 'syntax error' in error
    error = tool_error('test', files['cfg'], files['ckpt'], '--cfg-options',
                       'model.quantizer.bits')
    assert "'model.quantizer.bits': each entry is key=value" in error
    traces = tmp_path / 'traces.json'
    traces.write_text('{not json')
    error = tool_error('search_subnet', files['cfg'], files['ckpt'],
                       '--objective', 'perturbation', '--traces', traces,
                       '--input-shape', 1, 3, 16, 16, '--budgets', 5,
                       '--no-eval')
    assert 'traces.json' in error and 'not valid JSON' in error
    error = tool_error('digits_example', '--fp32-epochs', 0)
    assert '--fp32-epochs: must be >= 1, got 0' in error
    error = tool_error('benchmark', files['cfg'], files['ckpt'],
                       '--data-root', tmp_path / 'nodata')
    assert "--data-root" in error and 'is not a folder' in error


def test_transitional_bn_shape_is_named():
    from mmdrq.models import MultiPrecisionQAT
    with pytest.raises(ValueError, match=r'transitional_bn.input_shape='
                       r'\(1, 1, 16, 16\)'):
        MultiPrecisionQAT(build_small_classifier(), dict(bits=[8, 4]),
                          transitional_bn=dict(input_shape=(1, 1, 16, 16)))


def test_search_metric_needs_an_evaluation(tmp_path, files):
    error = tool_error('search_subnet', files['cfg'], files['ckpt'],
                       '--input-shape', 1, 3, 16, 16, '--budgets', 5,
                       '--metric', 'accuracy/top1', '--no-eval')
    assert '--metric accuracy/top1: nothing is evaluated with --no-eval' \
        in error


def test_search_names_a_misspelt_metric_and_keeps_the_search(tmp_path,
                                                            files):
    error = tool_error('search_subnet', files['cfg'], files['ckpt'],
                       '--input-shape', 1, 3, 16, 16, '--budgets', 5,
                       '--calibration-samples', 8, '--metric',
                       'accuracy/top5', '--work-dir', tmp_path)
    assert "--metric='accuracy/top5' is not a metric of this evaluation: " \
        "['accuracy/top1']" in error
    kept = json.loads((tmp_path / 'search.json').read_text())
    assert kept['subnets'] and 'metrics' not in kept


def test_dataset_tools_never_replace_a_users_files(tmp_path, monkeypatch):
    import cv2
    import numpy as np
    coco = tmp_path / 'mine'
    (coco / 'annotations').mkdir(parents=True)
    mine = coco / 'annotations' / 'instances_train.json'
    mine.write_text('{"my": "annotations"}')
    error = tool_error('make_tiny_datasets', '--coco-root', coco,
                       '--ade20k-root', tmp_path / 'ade')
    assert 'FileExistsError' in error and 'annotations' in error
    assert mine.read_text() == '{"my": "annotations"}'
    assert not (tmp_path / 'ade').exists()
    for argv, message in (
            (['--coco-root', tmp_path / 'x', '--ade20k-root', tmp_path / 'x'],
             'must be separate folders'),
            (['--num-images', 0, '--coco-root', tmp_path / 'c'],
             '--num-images must be a positive int, got 0')):
        assert message in tool_error('make_tiny_datasets', *argv)
    assert sorted(os.listdir(tmp_path)) == ['mine']
    # a user's image where a digit goes, another one beside the digits
    digits = tmp_path / 'digits'
    (digits / 'train' / '0').mkdir(parents=True)
    theirs = digits / 'train' / '0' / '0000.png'
    cv2.imwrite(str(theirs), np.full((8, 8), 7, np.uint8))
    before = theirs.read_bytes()
    error = tool_error('prepare_digits', '--root', digits)
    assert 'other contents' in error and '0000.png' in error
    assert theirs.read_bytes() == before
    assert os.listdir(digits / 'train' / '0') == ['0000.png']
    os.rename(theirs, digits / 'train' / '0' / 'cat.png')
    error = tool_error('prepare_digits', '--root', digits)
    assert 'not the digits' in error and 'cat.png' in error
    assert os.listdir(digits / 'train' / '0') == ['cat.png']
