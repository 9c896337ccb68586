"""Single-stage heads' post-processing in the exported graph: per image,
the whole-pipeline graph's detections are mmdet's ``predict_by_feat`` on
the head tensors of the same model's tensor graph, both run by ONNX
Runtime (FCOS's centerness, ATSS, GFL's distributions), at another input
size than the export's."""
import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')

from conftest import build_openmmlab_model  # noqa: E402
from mmdrq import quantize_model, set_bits  # noqa: E402
from mmdrq.deploy import SwitchableSession, export_to_folder  # noqa: E402
from mmdrq.deploy.loop import run_session  # noqa: E402

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
