# The tiny synthetic ADE20K-layout segmentation set that
# tools/make_tiny_datasets.py writes (64x64 images, 150 classes), for the
# small test variants in configs/segmentation/*_tiny.py: 64x64 crops. Listed
# beside a stock config, whose own dataset keys it cannot redefine (MMEngine
# refuses a key that two bases define), so its parts sit in the
# `tiny_ade20k` namespace and the config puts them in place:
#
#     train_dataloader = _base_.tiny_ade20k.train_dataloader
#     val_dataloader = _base_.tiny_ade20k.val_dataloader
#     test_dataloader = val_dataloader
#     val_evaluator = _base_.tiny_ade20k.val_evaluator
#     test_evaluator = val_evaluator
#
# Another dataset folder: override each dataloader's data_root, e.g.
# --cfg-options train_dataloader.dataset.data_root=R
#   val_dataloader.dataset.data_root=R test_dataloader.dataset.data_root=R
_data_root = 'data/tiny_ade20k'
_loader = dict(batch_size=2, num_workers=0, persistent_workers=False)

tiny_ade20k = dict(
    train_dataloader=dict(
        _loader,
        dataset=dict(data_root=_data_root, pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='RandomResize', scale=(64, 64), ratio_range=(1.0, 1.5),
                 keep_ratio=True),
            dict(type='RandomCrop', crop_size=(64, 64), cat_max_ratio=0.75),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackSegInputs'),
        ])),
    val_dataloader=dict(
        _loader,
        dataset=dict(data_root=_data_root, pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(64, 64), keep_ratio=True),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs'),
        ])),
    val_evaluator=dict(type='IoUMetric', iou_metrics=['mIoU']))
del _data_root, _loader
