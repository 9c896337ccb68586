"""Checkpoints for testing, export and search load exactly or not at all
(mmdrq.tools_common.load_trained, the check behind StrictLoadHook), and
never run pickled code."""
import os
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import mmdrq  # noqa: F401 (weights-only loading of MMEngine's local files)
from conftest import ROOT
from mmdrq.apis import build_model_from_config, load_trained

DIGITS = osp.join(ROOT, 'configs', 'classification', 'digits')
QAT_CFG = osp.join(DIGITS, 'resnet_digits_drq_8642.py')


def _save(model, path):
    torch.save(dict(meta=dict(), state_dict=model.state_dict()), path)
    return str(path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint of the digits QAT model, as the Runner writes it."""
    torch.manual_seed(0)
    model, _ = build_model_from_config(Config.fromfile(QAT_CFG))
    return _save(model, tmp_path_factory.mktemp('ckpt') / 'qat.pth'), model


def test_matching_checkpoint_loads(trained):
    path, saved = trained
    _, model, _ = load_trained(QAT_CFG, path)
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_fp32_checkpoint_is_refused(tmp_path):
    cfg = Config.fromfile(osp.join(DIGITS, 'resnet_digits_fp32.py'))
    init_default_scope('mmpretrain')
    path = _save(MODELS.build(cfg.model), tmp_path / 'fp32.pth')
    with pytest.raises(ValueError, match='holds no quantizer state: an '
                       'FP32 checkpoint') as info:
        load_trained(QAT_CFG, path)
    assert 'fp32.pth' in str(info.value)


def test_other_bits_are_refused(trained):
    path, _ = trained
    with pytest.raises(ValueError, match=r"qat.pth' was saved with bits="
                       r'\[8, 6, 4, 2\], the model has bits=\[4, 2\]'):
        load_trained(QAT_CFG, path, {'model.quantizer.bits': [4, 2]})
    with pytest.raises(ValueError, match="'variant': 'floor'"):
        load_trained(QAT_CFG, path, {
            'model.quantizer.weight_quantizer.variant': 'floor'})


@pytest.mark.parametrize('change,message', [
    ({'model.architecture.backbone.depth': 34},
     r'another model than the MultiPrecisionQAT of the config: \d+ '
     r"unexpected keys \(e.g. \['architecture.backbone.layer1.2"),
    ({'model.architecture.head.num_classes': 7},
     r"another model .*'architecture.head.fc.weight' has shape \[7, 64\] in "
     r'it and \[10, 64\] in the model'),
])
def test_other_architecture_is_refused(tmp_path, change, message):
    cfg = Config.fromfile(QAT_CFG)
    cfg.merge_from_dict(change)
    other, _ = build_model_from_config(cfg)
    path = _save(other, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=message):
        load_trained(QAT_CFG, path)


class _Payload:
    """Unpickling it would create a folder: code run by the load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker, )


def test_pickled_code_never_runs(trained, tmp_path, monkeypatch):
    path, model = trained
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / 'ran'
    checkpoint['meta']['note'] = _Payload(marker)
    payload = str(tmp_path / 'payload.pth')
    torch.save(checkpoint, payload)
    # turns torch's default weights_only=True off where none is passed
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(ValueError, match=r"payload.pth' holds objects that "
                       r'are not allowed in a checkpoint \(\w+\.mkdir\)'):
        load_trained(QAT_CFG, payload)
    assert not marker.exists()


def test_checkpoint_without_bit_list_upgraded_by_assumed_bits(trained,
                                                              tmp_path):
    """A checkpoint of an earlier mmdrq (no ``_extra_state``) is refused
    with the way forward named; tools/upgrade_checkpoint.py with the
    config's bits writes a copy that loads exactly; wrong bits, an existing
    OUT and a checkpoint that has its bit list are refused, CKPT untouched."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'upgrade_checkpoint', osp.join(ROOT, 'tools', 'upgrade_checkpoint.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path, saved = trained
    state = {k: v for k, v in saved.state_dict().items()
             if k != '_extra_state'}
    old = str(tmp_path / 'old.pth')
    torch.save(dict(meta=dict(), state_dict=state), old)
    before = open(old, 'rb').read()
    with pytest.raises(ValueError, match='upgrade_checkpoint.py'):
        load_trained(QAT_CFG, old)
    new = str(tmp_path / 'new.pth')
    with pytest.raises(ValueError, match=r'--assume-bits \[8, 4\] is not '
                       r"the config's bit list \[8, 6, 4, 2\]"):
        tool.upgrade(QAT_CFG, old, new, [8, 4])
    with pytest.raises(ValueError, match='already records its bit list'):
        tool.upgrade(QAT_CFG, path, new, [8, 6, 4, 2])
    assert not osp.exists(new)
    tool.upgrade(QAT_CFG, old, new, [8, 6, 4, 2])
    _, model, _ = load_trained(QAT_CFG, new)
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(FileExistsError, match='new.pth'):
        tool.upgrade(QAT_CFG, old, new, [8, 6, 4, 2])
    assert open(old, 'rb').read() == before
