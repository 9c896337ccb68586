# A SMALL TEST VARIANT, NOT A BENCHMARK: one-shot {8,6,4,2} Double Rounding
# QAT of a shrunken Mask R-CNN (ResNet-18, 64-channel FPN, RPN and RoI
# heads, random init) on the tiny synthetic COCO-format dataset that
# tools/make_tiny_datasets.py writes (3 shape classes with polygon masks,
# 96x128 images). It runs the whole mmdet instance segmentation pipeline
# (CocoDataset with masks, per-bit training, CocoMetric bbox and segm at
# every bit) in seconds on a CPU; its mAP numbers mean nothing.
#
#     python tools/make_tiny_datasets.py
#     python tools/train.py \
#         configs/detection/mask-rcnn_r18_fpn_drq-8642_tiny.py
#
# Another dataset folder: see configs/_base_/datasets/tiny_coco.py.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
          '../_base_/mmdrq_qat.py',
          '../_base_/datasets/tiny_coco.py']
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

_roi = _base_.model.roi_head
model = dict(
    _base_.mmdrq.model,
    architecture=dict(
        _base_.model,
        backbone=dict(_base_.model.backbone, depth=18, frozen_stages=-1,
                      norm_eval=False, init_cfg=None),
        neck=dict(_base_.model.neck, in_channels=[64, 128, 256, 512],
                  out_channels=64),
        rpn_head=dict(_base_.model.rpn_head, in_channels=64,
                      feat_channels=64),
        roi_head=dict(
            _roi,
            bbox_roi_extractor=dict(_roi.bbox_roi_extractor, out_channels=64),
            bbox_head=dict(_roi.bbox_head, in_channels=64,
                           fc_out_channels=128, num_classes=3),
            mask_roi_extractor=dict(_roi.mask_roi_extractor, out_channels=64),
            mask_head=dict(_roi.mask_head, num_convs=2, in_channels=64,
                           conv_out_channels=64, num_classes=3)),
        train_cfg=dict(
            _base_.model.train_cfg,
            rpn_proposal=dict(_base_.model.train_cfg.rpn_proposal,
                              nms_pre=200, max_per_img=100),
            rcnn=dict(_base_.model.train_cfg.rcnn,
                      sampler=dict(_base_.model.train_cfg.rcnn.sampler,
                                   num=64))),
        # score_thr=0: every image keeps its top boxes and masks, so COCO
        # mAP is defined at every bit even for a barely trained model
        test_cfg=dict(
            rpn=dict(_base_.model.test_cfg.rpn, nms_pre=200, max_per_img=100),
            rcnn=dict(_base_.model.test_cfg.rcnn, score_thr=0.0,
                      max_per_img=20))),
    quantizer=dict(bits=[8, 6, 4, 2]),
    loss_mode='per_bit')

# the tiny set's loaders, with masks
_with_masks = dict(type='LoadAnnotations', with_bbox=True, with_mask=True)
train_dataloader = _base_.tiny_coco.train_dataloader
train_dataloader.dataset.pipeline[1] = _with_masks
val_dataloader = _base_.tiny_coco.val_dataloader
val_dataloader.dataset.pipeline[2] = _with_masks
test_dataloader = val_dataloader
val_evaluator = dict(_base_.tiny_coco.val_evaluator, metric=['bbox', 'segm'])
test_evaluator = val_evaluator

# ALRS: Adam for everything, the quantization scales' lr scaled per bit
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=1e-4, weight_decay=5e-5))
# a constant lr: the stock 500-iteration warm-up and 12-epoch steps assume a
# long schedule
param_scheduler = []
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
auto_scale_lr = dict(enable=False, base_batch_size=2)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(
        _base_.mmdrq.checkpoint, interval=1, max_keep_ckpts=1))
log_processor = dict(window_size=1)
randomness = dict(seed=0)
load_from = None
