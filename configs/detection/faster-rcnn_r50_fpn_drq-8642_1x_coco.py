# Multi-precision {8,6,4,2} QAT of mmdet's Faster R-CNN R50-FPN on COCO from
# mmdet's FP32 checkpoint (37.4 box AP); the recipe of
# retinanet_r50_fpn_drq-8642_1x_coco.py (no paper numbers to match).
# FP layers (skip_first_last): backbone.conv1 and the prediction layers
# rpn_head.rpn_cls / rpn_reg and roi_head.bbox_head.fc_cls / fc_reg.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
          '../_base_/mmdrq_qat.py']

custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(_base_.mmdrq.model, architecture={{_base_.model}},
             quantizer=dict(bits=[8, 6, 4, 2]))
load_from = 'https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth'  # noqa

optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    optimizer=dict(type='SGD', lr=0.002, momentum=0.9, weight_decay=1e-4))
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(
    checkpoint=dict(
        _base_.mmdrq.checkpoint, interval=1, max_keep_ckpts=3,
        save_best='coco/bbox_mAP@w4a4', rule='greater'))
