# FP32 baseline of the low-bit detection benchmark (benchmarks/lowbit_detseg.py):
# mmdet's FCOS with its GN head, shrunk for a CPU (ResNet-18 at quarter width,
# from scratch; 64-channel FPN and head with 2 stacked convs), on the real-image COCO
# dataset that tools/make_real_datasets.py writes from scikit-image's sample
# images (coins and Hubble deep-field galaxies, 96x96 crops). Minutes on a CPU.
#
#     python tools/make_real_datasets.py
#     python tools/train.py configs/detection/fcos_r18_gn-head_fp32_real.py
#
# The QAT config (fcos_r18_gn-head_drq-8642_real.py) starts from this one's
# checkpoint. Another dataset folder: override every data root and the
# evaluators' ann_file (the roots are resolved when the config is read).
_base_ = ['mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
          '../_base_/datasets/real_det.py']
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(depth=18, base_channels=16, frozen_stages=-1,
                  norm_cfg=dict(type='BN', requires_grad=True),
                  norm_eval=False, style='pytorch', init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    bbox_head=dict(num_classes=2, in_channels=64, feat_channels=64,
                   stacked_convs=2),
    test_cfg=dict(nms_pre=200, max_per_img=50))

train_dataloader = _base_.real_det.train_dataloader
val_dataloader = _base_.real_det.val_dataloader
test_dataloader = val_dataloader
val_evaluator = _base_.real_det.val_evaluator
test_evaluator = val_evaluator

# from scratch in a few hundred iterations: AdamW, warm-up, cosine
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
max_iters = 1000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop',
                 max_iters=max_iters, val_interval=max_iters)
auto_scale_lr = dict(enable=False)
# the last fifth trains on the BN statistics the model is evaluated with;
# 400 iterations left the detector undertrained (docs/lowbit.md)
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=800)]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='mmdrq.AtomicCheckpointHook', by_epoch=False,
                    interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
load_from = None
