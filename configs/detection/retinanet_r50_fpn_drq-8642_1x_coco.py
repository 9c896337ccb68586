# Multi-precision {8,6,4,2} QAT of mmdet's RetinaNet R50-FPN on COCO from
# mmdet's FP32 checkpoint (36.5 box AP). The paper reports detection results
# but no numbers are available to us, so there is no table row to match; the
# recipe is ours: the stock 1x schedule with SGD at a tenth of its lr, ALRS
# on the quantization scales, every bit evaluated (coco/bbox_mAP@w4a4, ...).
# FP layers (skip_first_last): the backbone stem backbone.conv1 and the final
# classification/regression convs bbox_head.retina_cls / retina_reg.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
          '../_base_/mmdrq_qat.py']

custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(_base_.mmdrq.model, architecture={{_base_.model}},
             quantizer=dict(bits=[8, 6, 4, 2]))
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth'  # noqa

optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    optimizer=dict(type='SGD', lr=0.001, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(
    checkpoint=dict(
        _base_.mmdrq.checkpoint, interval=1, max_keep_ckpts=3,
        save_best='coco/bbox_mAP@w4a4', rule='greater'))
