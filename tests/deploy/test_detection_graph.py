"""Detectors' post-processing in the exported graph, at another input size
than the export's: per image, a single-stage graph's detections are
mmdet's ``predict_by_feat`` on the head tensors of the same model's tensor
graph, both run by ONNX Runtime (FCOS's centerness, ATSS, GFL's
distributions); a two-stage graph's (Faster R-CNN, Mask R-CNN: RPN, NMS and
RoiAlign in the graph, masks pasted by the runtime) are mmdet's own
``predict`` under deploy numerics. Two-stage models other than those are
refused at once, naming the part."""
import time

import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')

from conftest import build_openmmlab_model  # noqa: E402
from mmdrq import quantize_model, set_bits  # noqa: E402
from mmdrq.deploy import SwitchableSession, export_to_folder  # noqa: E402
from mmdrq.deploy.loop import run_session  # noqa: E402
from mmdrq.deploy.two_stage_graph import TwoStageDetections  # noqa: E402
from mmdrq.quantization.deploy_numerics import deploy_numerics  # noqa: E402
from mmdrq_runtime.inferencer import detections  # noqa: E402

R18 = {'model.backbone.depth': 18,
       'model.neck.in_channels': [64, 128, 256, 512],
       'model.bbox_head.num_classes': 3}
HEADS = {'fcos': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
         'atss': 'mmdet::atss/atss_r50_fpn_1x_coco.py',
         'gfl': 'mmdet::gfl/gfl_r50_fpn_1x_coco.py'}


@pytest.mark.parametrize('name', list(HEADS))
def test_graph_detections_are_mmdets(name, tmp_path):
    torch.manual_seed(0)
    model = build_openmmlab_model('mmdet', HEADS[name], R18)
    quantize_model(model, bits=[8, 4])
    model.train()
    generator = torch.Generator().manual_seed(0)
    for bit in (8, 4):
        set_bits(model, bit)
        with torch.no_grad():
            model(torch.randn(2, 3, 64, 96, generator=generator),
                  mode='tensor')
    model.eval()
    model.bbox_head.test_cfg.score_thr = 0.0  # random weights: low scores
    model.bbox_head.test_cfg.nms_pre = 50  # fewer than the pairs: a top-k
    sessions = {}
    for graph in ('pipeline', 'tensor'):
        meta = export_to_folder(model, str(tmp_path / graph), [8, 4], None,
                                (1, 3, 64, 96), graph=graph)
        assert meta['input_dims'] == [None, 3, None, None]
        sessions[graph] = SwitchableSession(str(tmp_path / graph))
    session, tensors = sessions['pipeline'], sessions['tensor']
    x = torch.randn(2, 3, 96, 64, generator=generator)  # another size
    size, inverse = (96, 60), (1 / 0.5, 1 / 0.25)
    for bit in (8, 4):
        boxes, scores, labels = session.set_bits(bit).run(
            x.numpy(), image_size=np.array(size, np.float32),
            inverse_scale=np.array(inverse, np.float32))
        heads = run_session(tensors.set_bits(bit), x)
        with torch.no_grad():
            found = model.bbox_head.predict_by_feat(
                *heads, rescale=True, batch_img_metas=[dict(
                    img_shape=size, scale_factor=(0.5, 0.25))] * 2)
        for image, want in enumerate(found):
            keep = scores[image] >= 0
            assert keep.sum() == len(want) > 0, (bit, keep.sum(), len(want))
            order = np.argsort(-scores[image][keep], kind='stable')
            want_order = want.scores.argsort(descending=True, stable=True)
            np.testing.assert_allclose(scores[image][keep][order],
                                       want.scores[want_order], rtol=1e-4,
                                       atol=1e-6)
            top = order[0], want_order[0]  # the best box, and its class
            assert labels[image][keep][top[0]] == want.labels[top[1]]
            np.testing.assert_allclose(boxes[image][keep][top[0]],
                                       want.bboxes[top[1]], rtol=1e-4,
                                       atol=1e-3)
            assert (boxes[image][keep][:, 2] <= size[1] * inverse[0] +
                    1e-3).all()


TWO_STAGE = {
    'faster_rcnn': 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    'mask_rcnn': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'}


def two_stage_model(config: str, bits):
    """A randomly initialised R18 two-stage detector with trained-like
    quantizer scales (a training-mode forward per bit), in eval mode."""
    from mmdet.structures import DetDataSample
    torch.manual_seed(0)
    options = {k.replace('bbox_head', 'roi_head.bbox_head'): v
               for k, v in R18.items()}
    if 'mask' in config:
        options['model.roi_head.mask_head.num_classes'] = 3
    model = build_openmmlab_model('mmdet', config, options)
    quantize_model(model, bits=list(bits))
    model.rpn_head.test_cfg.update(nms_pre=100, max_per_img=50)
    model.roi_head.test_cfg.update(score_thr=0.0, max_per_img=20)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for bit in bits:
        set_bits(model, bit)
        with torch.no_grad():
            TwoStageDetections(model)(
                torch.randn(2, 3, 64, 96, generator=generator),
                torch.tensor([64.0, 96.0]), torch.ones(2))
    return model.eval(), DetDataSample


@pytest.mark.parametrize('name', list(TWO_STAGE))
def test_two_stage_detections_are_mmdets(name, tmp_path):
    bits = (6, 4)  # 8-bit sums of random R18 weights pass 2**24: rounding
    model, DetDataSample = two_stage_model(TWO_STAGE[name], bits)
    meta = export_to_folder(model, str(tmp_path), bits, None,
                            (1, 3, 64, 96), graph='auto')
    assert meta['input_dims'] == [None, 3, None, None]
    masks = name == 'mask_rcnn'
    assert meta['pipeline']['outputs'] == \
        ['boxes', 'scores', 'labels'] + ['masks'] * masks
    session = SwitchableSession(str(tmp_path))
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    size, scale, original = (96, 60), (0.5, 0.25), (384, 120)
    for bit in bits:
        set_bits(model, bit)
        samples = [DetDataSample(metainfo=dict(
            img_shape=size, ori_shape=original, scale_factor=scale))
            for _ in x]
        with torch.no_grad(), deploy_numerics(
                model, lambda m: m.extract_feat(x[:1])):
            found = model.predict(x, samples)
        session.set_bits(bit)
        for image, sample in zip(x, found):
            want = sample.pred_instances
            got = detections(session, image[None].numpy(), size, scale,
                             original)
            assert len(got['scores']) == len(want) > 0, bit
            order = np.argsort(-got['scores'], kind='stable')
            want_order = want.scores.argsort(descending=True, stable=True)
            np.testing.assert_allclose(got['scores'][order],
                                       want.scores[want_order], rtol=1e-4,
                                       atol=1e-6)
            top = order[0], want_order[0]  # the best box, and its class
            assert got['labels'][top[0]] == want.labels[top[1]]
            np.testing.assert_allclose(got['boxes'][top[0]],
                                       want.bboxes[top[1]], rtol=1e-4,
                                       atol=1e-3)
            if masks:
                assert got['masks'].shape == (len(want), *original)
                differ = (got['masks'][top[0]] !=
                          want.masks[top[1]].numpy()).mean()
                assert differ <= 1e-3, (bit, differ)


def test_cascade_rcnn_refused_at_once():
    from mmdrq.deploy import check_exportable
    model = build_openmmlab_model(
        'mmdet', 'mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
        {'model.backbone.depth': 18,
         'model.neck.in_channels': [64, 128, 256, 512]})
    quantize_model(model, bits=[8, 4])
    start = time.perf_counter()
    with pytest.raises(ValueError, match='CascadeRCNN.*CascadeRoIHead'):
        check_exportable(model)
    assert time.perf_counter() - start < 2.0


def test_two_stage_tensor_graph_refused(tmp_path):
    model, _ = two_stage_model(TWO_STAGE['faster_rcnn'], (8, 4))
    with pytest.raises(ValueError, match="FasterRCNN.*graph='auto'"):
        export_to_folder(model, str(tmp_path / 'out'), [8], None,
                         (1, 3, 64, 96), graph='tensor')
    assert not (tmp_path / 'out').exists()
