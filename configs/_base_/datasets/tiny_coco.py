# The tiny synthetic COCO-format detection set that
# tools/make_tiny_datasets.py writes (3 shape classes, 96x128 images), for
# the small test variants in configs/detection/*_tiny.py. Listed beside a
# stock config, whose own dataset keys it cannot redefine (MMEngine refuses a
# key that two bases define), so its parts sit in the `tiny_coco` namespace
# and the config puts them in place:
#
#     train_dataloader = _base_.tiny_coco.train_dataloader
#     val_dataloader = _base_.tiny_coco.val_dataloader
#     test_dataloader = val_dataloader
#     val_evaluator = _base_.tiny_coco.val_evaluator
#     test_evaluator = val_evaluator
#
# Another dataset folder: the data roots are resolved when the config is
# read, so override each of them, e.g. --cfg-options
#   train_dataloader.dataset.data_root=R val_dataloader.dataset.data_root=R
#   test_dataloader.dataset.data_root=R
#   val_evaluator.ann_file=R/annotations/instances_val.json
#   test_evaluator.ann_file=R/annotations/instances_val.json
_data_root = 'data/tiny_coco/'
_metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'),
                 palette=[(220, 40, 40), (40, 60, 220), (60, 200, 40)])
_loader = dict(batch_size=2, num_workers=0, persistent_workers=False)

tiny_coco = dict(
    train_dataloader=dict(
        _loader,
        dataset=dict(
            data_root=_data_root,
            metainfo=_metainfo,
            ann_file='annotations/instances_train.json',
            data_prefix=dict(img='train/'),
            filter_cfg=dict(filter_empty_gt=True, min_size=8),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='Resize', scale=(128, 96), keep_ratio=True),
                dict(type='RandomFlip', prob=0.5),
                dict(type='PackDetInputs'),
            ])),
    val_dataloader=dict(
        _loader,
        dataset=dict(
            data_root=_data_root,
            metainfo=_metainfo,
            ann_file='annotations/instances_val.json',
            data_prefix=dict(img='val/'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='Resize', scale=(128, 96), keep_ratio=True),
                dict(type='LoadAnnotations', with_bbox=True),
                dict(type='PackDetInputs',
                     meta_keys=('img_id', 'img_path', 'ori_shape',
                                'img_shape', 'scale_factor')),
            ])),
    val_evaluator=dict(
        type='CocoMetric',
        ann_file=_data_root + 'annotations/instances_val.json',
        metric='bbox'))
del _data_root, _metainfo, _loader
