# Multi-precision {8,6,4,2} QAT of mmseg's DeepLabV3 R50-D8 on ADE20K
# (512x512) from mmseg's FP32 checkpoint (42.42 mIoU). The paper reports
# segmentation results but no numbers are available to us; the recipe is
# ours: half the stock 80k schedule, SGD at a tenth of its lr, ALRS on the
# quantization scales, every bit evaluated (mIoU@w4a4, ...).
# FP layers (skip_first_last): the stem's first conv backbone.stem.0 and the
# classifiers decode_head.conv_seg / auxiliary_head.conv_seg.
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py',
          '../_base_/mmdrq_qat.py']

custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(_base_.mmdrq.model, architecture={{_base_.model}},
             quantizer=dict(bits=[8, 6, 4, 2]))
load_from = 'https://download.openmmlab.com/mmsegmentation/v0.5/deeplabv3/deeplabv3_r50-d8_512x512_80k_ade20k/deeplabv3_r50-d8_512x512_80k_ade20k_20200614_185028-0bb3f844.pth'  # noqa

optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    optimizer=dict(type='SGD', lr=0.001, momentum=0.9, weight_decay=5e-4))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-5, power=0.9, begin=0, end=40000,
         by_epoch=False)
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=40000,
                 val_interval=4000)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(
    checkpoint=dict(
        _base_.mmdrq.checkpoint, by_epoch=False, interval=4000,
        max_keep_ckpts=3, save_best='mIoU@w4a4', rule='greater'))
