"""Tool arguments that contradict each other are errors naming them, before
any model, dataset or checkpoint is read (in-process: no work is done)."""
import importlib.util
import os.path as osp
import sys

import pytest

from conftest import ROOT, TOOLS

DIGITS = osp.join(ROOT, 'configs', 'classification', 'digits',
                  'resnet_digits_drq_8642.py')


def tool_main(name: str, monkeypatch, *argv):
    spec = importlib.util.spec_from_file_location(
        f'tool_{name}', osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, 'argv', [name, *map(str, argv)])
    return module.main()


@pytest.mark.parametrize('argv, message', [
    (('--ort-kernels', 'integer'),
     '--ort-kernels integer needs --backend onnxruntime'),
    (('--backend', 'onnxruntime', '--numerics', 'deploy'),
     '--numerics deploy needs --backend pytorch'),
])
def test_test_tool_refuses_contradicting_options(monkeypatch, tmp_path, argv,
                                                 message):
    missing = tmp_path / 'never_read.pth'
    with pytest.raises(ValueError, match=message):
        tool_main('test', monkeypatch, DIGITS, missing, '--work-dir',
                  tmp_path / 'work', *argv)
    assert not (tmp_path / 'work').exists()
