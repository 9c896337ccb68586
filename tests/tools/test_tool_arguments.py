"""Tool arguments that contradict each other are errors naming them, before
any model, dataset or checkpoint is read (in-process: no work is done)."""
import os.path as osp

import pytest

from conftest import DIGITS, tool_error

QAT_CFG = osp.join(DIGITS, 'resnet_digits_drq_8642.py')


@pytest.mark.parametrize('argv, message', [
    (('--ort-kernels', 'integer'),
     '--ort-kernels integer needs --backend onnxruntime'),
    (('--backend', 'onnxruntime', '--numerics', 'deploy'),
     '--numerics deploy needs --backend pytorch'),
])
def test_test_tool_refuses_contradicting_options(tmp_path, argv, message):
    missing = tmp_path / 'never_read.pth'
    error = tool_error('test', QAT_CFG, missing, '--work-dir',
                       tmp_path / 'work', *argv)
    assert error.startswith('ValueError') and message in error, error
    assert not (tmp_path / 'work').exists()
