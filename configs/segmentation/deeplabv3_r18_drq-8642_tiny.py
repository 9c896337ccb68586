# A SMALL TEST VARIANT, NOT A BENCHMARK: one-shot {8,6,4,2} Double Rounding
# QAT of a shrunken DeepLabV3 (ResNetV1c-18-D8, narrow ASPP and FCN heads,
# random init, plain BN) on the tiny synthetic ADE20K-layout dataset that
# tools/make_tiny_datasets.py writes (64x64 images labelled with ADE20K's
# first three classes, wall, building and sky; the heads keep ADE20K's 150
# outputs). It runs the whole mmseg pipeline
# (ADE20KDataset, per-bit training, IoUMetric at every bit) in seconds on a
# CPU; its mIoU numbers mean nothing.
#
#     python tools/make_tiny_datasets.py
#     python tools/train.py configs/segmentation/deeplabv3_r18_drq-8642_tiny.py
#
# Another dataset folder: see configs/_base_/datasets/tiny_ade20k.py.
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py',
          '../_base_/mmdrq_qat.py',
          '../_base_/datasets/tiny_ade20k.py']
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

crop_size = (64, 64)
# SyncBN needs a process group; plain BN runs in one process
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    _base_.mmdrq.model,
    architecture=dict(
        _base_.model,
        pretrained=None,
        data_preprocessor=dict(_base_.model.data_preprocessor,
                               size=crop_size),
        backbone=dict(_base_.model.backbone, depth=18, norm_cfg=norm_cfg,
                      init_cfg=None),
        # ASPP dilations sized for the 8x8 feature map of a 64x64 crop
        decode_head=dict(_base_.model.decode_head, in_channels=512,
                         channels=32, dilations=(1, 2, 3, 4), num_classes=150,
                         norm_cfg=norm_cfg),
        auxiliary_head=dict(_base_.model.auxiliary_head, in_channels=256,
                            channels=16, num_classes=150, norm_cfg=norm_cfg)),
    quantizer=dict(bits=[8, 6, 4, 2]),
    loss_mode='per_bit')

train_dataloader = _base_.tiny_ade20k.train_dataloader
val_dataloader = _base_.tiny_ade20k.val_dataloader
test_dataloader = val_dataloader
val_evaluator = _base_.tiny_ade20k.val_evaluator
test_evaluator = val_evaluator

# ALRS: Adam for everything, the quantization scales' lr scaled per bit
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=1e-4, weight_decay=5e-5))
# a constant lr: the stock poly decay spans 80k iterations
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(
        _base_.mmdrq.checkpoint, by_epoch=False, interval=4,
        max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=1)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
load_from = None
