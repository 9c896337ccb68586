# The real-image COCO-format detection set that tools/make_real_datasets.py
# writes from scikit-image's sample images (coins and Hubble deep-field
# galaxies, 96x96 crops), for the low-bit benchmark's detection configs.
# Listed beside a stock config, whose own dataset keys it cannot redefine
# (MMEngine refuses a key that two bases define), so its parts sit in the
# `real_det` namespace and the config puts them in place:
#
#     train_dataloader = _base_.real_det.train_dataloader
#     val_dataloader = _base_.real_det.val_dataloader
#     test_dataloader = val_dataloader
#     val_evaluator = _base_.real_det.val_evaluator
#     test_evaluator = val_evaluator
#
# Another dataset folder: override every data root and the evaluators'
# ann_file (the roots are resolved when the config is read).
_data_root = 'data/real_det/'
_metainfo = dict(classes=('coin', 'galaxy'),
                 palette=[(220, 160, 40), (60, 120, 220)])

real_det = dict(
    train_dataloader=dict(
        batch_size=4,
        num_workers=0,
        persistent_workers=False,
        sampler=dict(type='InfiniteSampler', shuffle=True),
        batch_sampler=None,
        dataset=dict(
            data_root=_data_root,
            metainfo=_metainfo,
            ann_file='annotations/instances_train.json',
            data_prefix=dict(img='train/'),
            filter_cfg=dict(filter_empty_gt=True, min_size=4),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='RandomFlip', prob=0.5),
                dict(type='PackDetInputs'),
            ])),
    val_dataloader=dict(
        batch_size=8,
        num_workers=0,
        persistent_workers=False,
        dataset=dict(
            data_root=_data_root,
            metainfo=_metainfo,
            ann_file='annotations/instances_val.json',
            data_prefix=dict(img='val/'),
            # Resize to the crops' own size: no change, but mmdet's
            # post-processing needs the scale factor it records
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(96, 96), keep_ratio=True),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='PackDetInputs',
                     meta_keys=('img_id', 'img_path', 'ori_shape',
                                'img_shape', 'scale_factor')),
            ])),
    val_evaluator=dict(
        type='CocoMetric',
        ann_file=_data_root + 'annotations/instances_val.json',
        metric='bbox'))
del _data_root, _metainfo
