# FP32 baseline of the built-in example: a small mmpretrain ResNet (CIFAR
# stem, 3 stages of 16/32/64 channels) on scikit-learn's handwritten digits,
# written by tools/prepare_digits.py. Runs on a laptop CPU in about a minute.
_base_ = 'mmpretrain::_base_/default_runtime.py'
# for mmdrq.AtomicCheckpointHook when run by another package's tools
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

data_root = 'data/digits'
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(
        type='ClsDataPreprocessor', num_classes=10, mean=[78.0] * 3,
        std=[96.0] * 3, to_rgb=False),
    backbone=dict(
        type='ResNet_CIFAR', depth=18, num_stages=3, stem_channels=16,
        base_channels=16, strides=(1, 2, 2), dilations=(1, 1, 1),
        out_indices=(2, )),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead', num_classes=10, in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0), topk=(1, )))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(16, 16)),
    dict(type='RandomCrop', crop_size=16, padding=2),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(16, 16)),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=64, num_workers=0,
    dataset=dict(type='CustomDataset', data_root=data_root,
                 data_prefix='train', pipeline=train_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=128, num_workers=0,
    dataset=dict(type='CustomDataset', data_root=data_root,
                 data_prefix='val', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(type='Adam', lr=2e-3, weight_decay=5e-5))
param_scheduler = dict(type='CosineAnnealingLR', T_max=30, by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=10)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='mmdrq.AtomicCheckpointHook', interval=10, max_keep_ckpts=1))
randomness = dict(seed=0, deterministic=False)
