"""Distillation from the FP32 model (``fp_distill``): every bit learns a
frozen float copy's logits; the copy is loaded strictly from its checkpoint
and stays out of the QAT model's state."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmengine.optim import OptimWrapper

from conftest import (RETINANET_CFG, TINY_RETINA, build_openmmlab_model,
                      classifier_batch, det_batch)
from mmdrq.models import MultiPrecisionQAT
from mmdrq.quantization import set_bits

BITS = [8, 6, 4, 2]


@pytest.fixture
def float_checkpoint(small_classifier, tmp_path):
    torch.manual_seed(0)
    model = small_classifier()
    path = str(tmp_path / 'fp32.pth')
    torch.save(dict(state_dict=model.state_dict()), path)
    return model, path


def test_every_bit_learns_the_float_logits(float_checkpoint):
    fp, path = float_checkpoint
    model = MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                              fp_distill=dict(checkpoint=path,
                                              temperature=2.0))
    before = copy.deepcopy(model)
    batch = classifier_batch()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), 0.01))
    log_vars = model.train_step(batch, wrapper)

    # the reference: KL(float || bit) of softmax(logits / T), T^2, mean
    # over images, in float64, on the same preprocessed batch and state
    data = before.data_preprocessor(batch, True)
    with torch.no_grad():
        teacher = fp.eval()(data['inputs'], mode='tensor').double() / 2
    before.train()
    set_bits(before.architecture, BITS[0])
    with torch.no_grad():
        student = before(data['inputs'], mode='tensor').double() / 2
    expected = 4 * F.kl_div(F.log_softmax(student, 1),
                            F.log_softmax(teacher, 1), log_target=True,
                            reduction='sum') / len(student)
    torch.testing.assert_close(log_vars['loss_fp_distill@w8a8'].double(),
                               expected, rtol=1e-5, atol=1e-7)
    for bit in BITS:
        assert torch.isfinite(log_vars[f'loss_fp_distill@w{bit}a{bit}'])
    # the copy is frozen, off the state dict and the optimizer
    assert not any('teacher' in k for k in model.state_dict())
    teacher_model = model._plugins[-1].teacher
    for name, value in teacher_model.state_dict().items():
        torch.testing.assert_close(value, fp.state_dict()[name])
    assert not any(p.requires_grad for p in teacher_model.parameters())


def test_detector_learns_the_float_heads_logits(tmp_path):
    """mmdet's tensor mode calls bbox_head.forward() past hooks: the copy
    runs in loss mode, so its head's outputs are caught."""
    torch.manual_seed(0)
    fp = build_openmmlab_model('mmdet', RETINANET_CFG, TINY_RETINA)
    path = str(tmp_path / 'fp32.pth')
    torch.save(dict(state_dict=fp.state_dict()), path)
    model = MultiPrecisionQAT(fp, dict(bits=BITS),
                              fp_distill=dict(checkpoint=path))
    log_vars = model.train_step(det_batch(), OptimWrapper(
        torch.optim.SGD(model.parameters(), 0.01)))
    for bit in BITS:
        value = log_vars[f'loss_fp_distill@w{bit}a{bit}']
        assert torch.isfinite(value) and value >= 0


def test_wrong_checkpoints_and_keys_are_refused(float_checkpoint, tmp_path,
                                                small_classifier):
    fp, path = float_checkpoint
    qat = MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS))
    qat_path = str(tmp_path / 'qat.pth')
    torch.save(dict(state_dict=qat.state_dict()), qat_path)
    with pytest.raises(ValueError, match='not an FP32 checkpoint'):
        MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                          fp_distill=dict(checkpoint=qat_path))
    other = dict(state_dict={k: v for k, v in fp.state_dict().items()
                             if 'head' not in k})
    other_path = str(tmp_path / 'other.pth')
    torch.save(other, other_path)
    with pytest.raises(ValueError, match='does not fit the model.*head.fc'):
        MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                          fp_distill=dict(checkpoint=other_path))
    with pytest.raises(ValueError, match=r"unknown fp_distill key\(s\) "
                       r"\['temprature'\]"):
        MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                          fp_distill=dict(checkpoint=path, temprature=2))
    with pytest.raises(ValueError, match='fp_distill.weight must be'):
        MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                          fp_distill=dict(checkpoint=path, weight=0))
    with pytest.raises(ValueError, match='with checkpoint='):
        MultiPrecisionQAT(copy.deepcopy(fp), dict(bits=BITS),
                          fp_distill=dict(weight=1.0))
