"""Momentum teachers (EMA target networks, second instances of the student)
are converted as their student, so that the student's parameters still map
onto them by name and by order (mmpretrain's MoCo v3, BYOL, DenseCL, CAE)."""
import torch
from torch import nn

from conftest import build_openmmlab_model
from mmdrq import quantize_model, set_bits

MOCOV3_TINY = {
    'model.backbone.depth': 18,
    'model.backbone.norm_cfg': dict(type='BN'),
    'model.neck.in_channels': 512,
    'model.neck.hid_channels': 32,
    'model.neck.out_channels': 16,
    'model.head.predictor.in_channels': 16,
    'model.head.predictor.hid_channels': 32,
    'model.head.predictor.out_channels': 16,
}


def _status(model):
    return {r.layer: r.status for r in model.mmdrq_report}


def test_ema_teacher_follows_its_student():
    torch.manual_seed(0)
    model = build_openmmlab_model(
        'mmpretrain', 'mmpretrain::mocov3/'
        'mocov3_resnet50_8xb512-amp-coslr-100e_in1k.py', MOCOV3_TINY)
    quantize_model(model, bits=[8, 4])
    status = _status(model)
    # the first layer stays FP in the student and in its copy; the
    # prediction layer is the head's, not the EMA teacher's (registered last)
    assert status['backbone.conv1'].startswith('FP: first layer')
    assert status['momentum_encoder.module.0.conv1'].startswith(
        'FP: first layer')
    assert status['momentum_encoder.module.1.fc1'].startswith('quantized')
    assert status['head.predictor.fc1'].startswith('FP: prediction layer')

    student = nn.Sequential(model.backbone, model.neck)
    teacher = model.momentum_encoder
    assert [n for n, _ in teacher.module.named_parameters()] == \
        [n for n, _ in student.named_parameters()]
    assert [n for n, _ in teacher.module.named_buffers()] == \
        [n for n, _ in student.named_buffers()]
    assert set(teacher.avg_parameters) == \
        {n for n, _ in teacher.module.named_parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())

    set_bits(model, 4)
    views = [torch.rand(2, 3, 32, 32) for _ in range(2)]
    model.train()
    losses = model.loss(views, [])
    sum(losses.values()).backward()
    # the first update copies the student into the teacher: learned scales
    # included, so the teacher quantizes as its student does
    for (name, p), q in zip(student.named_parameters(),
                            teacher.module.parameters()):
        assert torch.equal(p, q), name
    assert any('scale' in n for n in teacher.avg_parameters)


class _Student(nn.Module):

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.bn(self.stem(x)).mean((2, 3)))


class _WithTeacher(nn.Module):
    """CAE's pattern: a second instance of the backbone's class, updated
    from it by parameter order."""

    def __init__(self):
        super().__init__()
        self.backbone = _Student()
        self.teacher = _Student()
        self.head = nn.Linear(4, 2)


def test_second_instance_converted_as_the_first():
    model = quantize_model(_WithTeacher(), bits=[8, 4])
    status = _status(model)
    assert status['backbone.stem'].startswith('FP: first layer')
    assert status['teacher.stem'] == 'FP: first layer (skip_first_last of ' \
        'a copy)'
    shapes = [(p.shape, q.shape) for p, q in zip(
        model.backbone.parameters(), model.teacher.parameters())]
    assert all(a == b for a, b in shapes)
    assert len(list(model.backbone.parameters())) == \
        len(list(model.teacher.parameters()))
