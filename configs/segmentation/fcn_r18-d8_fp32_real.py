# FP32 baseline of the low-bit segmentation benchmark
# (benchmarks/lowbit_detseg.py): mmseg's FCN-D8, shrunk for a CPU
# (ResNetV1c-18 at quarter width, from scratch, plain BN; 32-channel FCN
# head, 16-channel auxiliary head), on the real-image mmseg-layout dataset that
# tools/make_real_datasets.py writes from scikit-image's sample images
# (background, coins, IHC nuclei; 64x64 crops of the images enlarged twice).
# Minutes on a CPU.
#
#     python tools/make_real_datasets.py
#     python tools/train.py configs/segmentation/fcn_r18-d8_fp32_real.py
#
# The QAT config (fcn_r18-d8_drq-8642_real.py) starts from this one's
# checkpoint. Another dataset folder: override every dataloader's data_root.
_base_ = [
    'mmseg::_base_/models/fcn_r50-d8.py', 'mmseg::_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

data_root = 'data/real_seg'
crop_size = (64, 64)
metainfo = dict(classes=('background', 'coin', 'nucleus'),
                palette=[(0, 0, 0), (220, 160, 40), (160, 60, 160)])
# SyncBN needs a process group; plain BN runs in one process
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=18, stem_channels=16, base_channels=16,
                  norm_cfg=norm_cfg),
    decode_head=dict(in_channels=128, channels=32, num_classes=3,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=3,
                        norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo,
               img_suffix='.png', seg_map_suffix='.png')
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(dataset, pipeline=train_pipeline,
                 data_prefix=dict(img_path='img_dir/train',
                                  seg_map_path='ann_dir/train')))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(dataset, pipeline=test_pipeline,
                 data_prefix=dict(img_path='img_dir/val',
                                  seg_map_path='ann_dir/val')))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# from scratch in a few hundred iterations: AdamW, warm-up, cosine
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=3e-3, weight_decay=1e-4))
max_iters = 1000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
# the last fifth trains on the BN statistics the model is evaluated with:
# batches of 4 dissimilar crops make the running statistics a noisy
# average, worth several mIoU either way (docs/lowbit.md)
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=800)]
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    checkpoint=dict(type='mmdrq.AtomicCheckpointHook', by_epoch=False,
                    interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
load_from = None
