"""Distillation from the highest bit (detection and segmentation) and
per-bit loss weights of the multi-precision wrapper."""
import pytest
import torch
from mmengine.optim import OptimWrapper

from conftest import (DEEPLABV3_CFG, DEEPLAB_CPU_OPTIONS, RETINANET_CFG,
                      TINY_RETINA, build_openmmlab_model, classifier_batch,
                      det_batch)
from mmdrq.models import MultiPrecisionQAT
from mmdrq.models.head_distill import HeadDistill

BITS = [8, 4, 2]
TINY_DEEPLAB = dict(DEEPLAB_CPU_OPTIONS, **{
    'model.backbone.depth': 18, 'model.decode_head.in_channels': 512,
    'model.decode_head.channels': 8, 'model.decode_head.num_classes': 5,
    'model.decode_head.dilations': (1, 2, 3, 4),
    # no dropout: the test recomputes the step's outputs
    'model.decode_head.dropout_ratio': 0.0,
    'model.auxiliary_head.in_channels': 256,
    'model.auxiliary_head.channels': 8,
    'model.auxiliary_head.num_classes': 5,
    'model.data_preprocessor.size': (32, 32),
})


def retinanet():
    return build_openmmlab_model('mmdet', RETINANET_CFG, TINY_RETINA)


def deeplab():
    return build_openmmlab_model('mmseg', DEEPLABV3_CFG, TINY_DEEPLAB)


def seg_batch():
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(4)
    samples = []
    for _ in range(2):
        sample = SegDataSample(metainfo=dict(
            img_shape=(32, 32), ori_shape=(32, 32), pad_shape=(32, 32)))
        sample.gt_sem_seg = PixelData(data=torch.randint(
            0, 5, (1, 32, 32), generator=g))
        samples.append(sample)
    return dict(inputs=[torch.randint(0, 256, (3, 32, 32), generator=g,
                                      dtype=torch.uint8) for _ in range(2)],
                data_samples=samples)


def reference_sigmoid_kl(student, teacher, T):
    """Bernoulli KL(p_t || p_s) at temperature T summed over every class,
    anchor and position, over the teacher's summed probabilities at T=1
    (at least 1), times T^2; in float64."""
    total, count = 0.0, 0.0
    for s, t in zip(student, teacher):
        p = torch.sigmoid(t.double() / T)
        q = torch.sigmoid(s.double() / T)
        kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        total += kl.sum()
        count += torch.sigmoid(t.double()).sum()
    return T * T * total / max(count, 1.0)


def reference_box_error(student, teacher, scores):
    """Per anchor and coordinate, |s - t| / (|t| + 1) times the teacher's
    highest class probability at that anchor, summed; in float64, one
    anchor at a time (boxes A*4 channels, scores A*C)."""
    total = 0.0
    for s, t, c in zip(student, teacher, scores):
        anchors = s.shape[1] // 4
        classes = c.shape[1] // anchors
        for a in range(anchors):
            p = torch.sigmoid(c[:, a * classes:(a + 1) * classes].double())
            p = p.max(dim=1).values
            for k in range(4):
                sk, tk = s[:, 4 * a + k].double(), t[:, 4 * a + k].double()
                total += (p * (sk - tk).abs() / (tk.abs() + 1)).sum()
    return total


def reference_detection(student, teacher, T, box_weight):
    """Class KL, plus the box term over the same count, of [scores] +
    [boxes] per level."""
    levels = len(teacher) // 2
    scores = teacher[:levels]
    count = max(float(sum(torch.sigmoid(t.double()).sum() for t in scores)),
                1.0)
    return reference_sigmoid_kl(student[:levels], scores, T) + box_weight * \
        reference_box_error(student[levels:], teacher[levels:], scores) / count


def reference_softmax_kl(student, teacher, T):
    p = torch.softmax(teacher.double() / T, 1)
    q = torch.softmax(student.double() / T, 1)
    per_pixel = (p * torch.log(p / q)).sum(1)
    return T * T * per_pixel.mean()


@pytest.mark.parametrize('T', [1.0, 2.5])
def test_losses_match_hand_written(T):
    torch.manual_seed(0)
    det = HeadDistill(retinanet(), 'logits', temperature=T)
    # 9 anchors x 3 classes per position, two levels
    teacher = [torch.randn(2, 27, 4, 4) * 3, torch.randn(2, 27, 2, 2) * 3]
    student = [t + torch.randn_like(t) for t in teacher]
    torch.testing.assert_close(
        det.loss_of(student, teacher).double(),
        reference_sigmoid_kl(student, teacher, T), rtol=1e-5, atol=1e-7)
    # ties: a student equal to the teacher has zero loss
    assert det.loss_of(teacher, teacher).abs() < 1e-6
    # a teacher sure of background everywhere: the count is at least 1
    quiet = [t - 14 for t in teacher]
    assert float(sum(torch.sigmoid(t).sum() for t in quiet)) < 1
    torch.testing.assert_close(
        det.loss_of(student, quiet).double(),
        reference_sigmoid_kl(student, quiet, T), rtol=1e-5, atol=1e-7)

    seg = HeadDistill(deeplab(), 'logits', temperature=T)
    t = torch.randn(2, 5, 6, 7) * 2
    s = t + torch.randn_like(t)
    s[0, :, 0, 0] = t[0, :, 0, 0]  # one pixel tied
    torch.testing.assert_close(seg.loss_of([s], [t]).double(),
                               reference_softmax_kl(s, t, T), rtol=1e-5,
                               atol=1e-7)

    # with boxes: 9 anchors x 4 coordinates, relative errors, one tied box
    boxes = HeadDistill(retinanet(), 'logits', temperature=T,
                        box_weight=0.7)
    t_boxes = [torch.randn(2, 36, 4, 4) * 5, torch.randn(2, 36, 2, 2) * 5]
    s_boxes = [b + torch.randn_like(b) for b in t_boxes]
    s_boxes[0][1, 4:8, 2, 3] = t_boxes[0][1, 4:8, 2, 3]
    full_s, full_t = student + s_boxes, teacher + t_boxes
    torch.testing.assert_close(
        boxes.loss_of(full_s, full_t).double(),
        reference_detection(full_s, full_t, T, 0.7), rtol=1e-5, atol=1e-7)
    assert boxes.loss_of(full_t, full_t).abs() < 1e-6

    feat = HeadDistill(retinanet(), 'features')
    teacher = [torch.randn(2, 8, 4, 4), torch.randn(2, 8, 2, 2)]
    student = [x + torch.randn_like(x) for x in teacher]
    expected = sum(((s.double() - t.double())**2).mean()
                   for s, t in zip(student, teacher)) / 2
    torch.testing.assert_close(feat.loss_of(student, teacher).double(),
                               expected, rtol=1e-5, atol=1e-7)


class FrozenWrapper(OptimWrapper):
    """Backward, no step: the weights stay, so each bit's outputs can be
    recomputed afterwards."""

    def step(self, **kwargs):
        pass


@pytest.mark.parametrize('kind', ['det', 'det_boxes', 'seg', 'features'])
def test_train_step_adds_distill_loss_of_lower_bits(kind):
    import mmdrq
    torch.manual_seed(0)
    arch, data = (deeplab(), seg_batch()) if kind == 'seg' else \
        (retinanet(), det_batch())
    target = 'features' if kind == 'features' else 'logits'
    box_weight = 1.5 if kind == 'det_boxes' else 0.0
    model = MultiPrecisionQAT(arch, dict(bits=BITS), head_distill=dict(
        target=target, weight=0.5, temperature=2.0, box_weight=box_weight))
    wrapper = FrozenWrapper(torch.optim.SGD(model.parameters(), 0.0))
    log_vars = model.train_step(data, wrapper)
    assert 'loss_distill@w8a8' not in log_vars
    # the reference: each bit's outputs recomputed by hand (eval mode is
    # not used: train-mode BN normalises by the batch, as in the step)
    batch = model.data_preprocessor(data, True)
    arch = model.architecture
    outputs = {}
    with torch.no_grad():
        for bit in BITS:
            mmdrq.set_bits(arch, bit)
            if kind == 'seg':
                feats = arch.extract_feat(batch['inputs'])
                outputs[bit] = [arch.decode_head.forward(feats)]
            else:
                feats = arch.extract_feat(batch['inputs'])
                scores, boxes = arch.bbox_head(feats)
                outputs[bit] = list(feats) if kind == 'features' else \
                    list(scores) + (list(boxes) if box_weight else [])
    mmdrq.set_bits(arch, 8)
    for bit in BITS[1:]:
        s, t = outputs[bit], outputs[8]
        if kind == 'det':
            expected = reference_sigmoid_kl(s, t, 2.0)
        elif kind == 'det_boxes':
            expected = reference_detection(s, t, 2.0, box_weight)
        elif kind == 'seg':
            expected = reference_softmax_kl(s[0], t[0], 2.0)
        else:
            expected = sum(((a.double() - b.double())**2).mean()
                           for a, b in zip(s, t)) / len(s)
        got = log_vars[f'loss_distill@w{bit}a{bit}']
        assert got > 0
        torch.testing.assert_close(got.double(), 0.5 * expected, rtol=1e-4,
                                   atol=1e-7)


def test_bad_distill_config_is_an_error():
    with pytest.raises(ValueError, match="head_distill.target must be one "
                       "of .*'logit'"):
        MultiPrecisionQAT(retinanet(), dict(bits=BITS),
                          head_distill=dict(target='logit'))
    with pytest.raises(ValueError, match='head_distill.temperature must be '
                       'a positive number, got 0'):
        MultiPrecisionQAT(retinanet(), dict(bits=BITS),
                          head_distill=dict(temperature=0))
    with pytest.raises(ValueError, match=r"unknown head_distill key\(s\) "
                       r"\['alpha'\]"):
        MultiPrecisionQAT(retinanet(), dict(bits=BITS),
                          head_distill=dict(alpha=0.5))
    with pytest.raises(ValueError, match='head_distill.box_weight must be a '
                       'number >= 0, got -1'):
        MultiPrecisionQAT(retinanet(), dict(bits=BITS),
                          head_distill=dict(box_weight=-1))
    with pytest.raises(ValueError, match="head_distill.box_weight=0.5 needs "
                       "target='logits' on a single-stage mmdet detector; "
                       'EncoderDecoder'):
        MultiPrecisionQAT(deeplab(), dict(bits=BITS),
                          head_distill=dict(box_weight=0.5))
    with pytest.raises(ValueError, match="target='features' needs a model "
                       'with a neck'):
        MultiPrecisionQAT(deeplab(), dict(bits=BITS),
                          head_distill=dict(target='features'))


def test_bit_loss_weights_scale_that_bits_loss(small_classifier):
    class LossRecorder(OptimWrapper):
        def update_params(self, loss, **kwargs):
            self.losses.append(loss.detach())
            super().update_params(loss, **kwargs)

    torch.manual_seed(0)
    classifier = small_classifier()
    model = MultiPrecisionQAT(classifier, dict(bits=[8, 6, 4, 2]),
                              bit_loss_weights={'2': 2.0, 6: 0.5})
    assert model.bit_loss_weights == {2: 2.0, 6: 0.5}
    wrapper = LossRecorder(torch.optim.SGD(model.parameters(), 0.0))
    wrapper.losses = []
    log_vars = model.train_step(classifier_batch(), wrapper)
    logged = [log_vars[f'loss@w{b}a{b}'] for b in (8, 6, 4, 2)]
    factors = [1.0, 0.5, 1.0, 2.0]
    for got, plain, factor in zip(wrapper.losses, logged, factors):
        torch.testing.assert_close(got, plain * factor)
    torch.testing.assert_close(log_vars['loss'], sum(wrapper.losses))


@pytest.mark.parametrize('weights, message', [
    ({3: 2.0}, r'bit_loss_weights key=3 is not one of the bits'),
    ({2: 0.0}, r'bit_loss_weights\[2\] must be a positive number, got 0.0'),
    ([2.0], r'bit_loss_weights must be a dict'),
])
def test_bad_bit_loss_weights_are_errors(small_classifier, weights, message):
    with pytest.raises(ValueError, match=message):
        MultiPrecisionQAT(small_classifier(), dict(bits=[8, 6, 4, 2]),
                          bit_loss_weights=weights)
