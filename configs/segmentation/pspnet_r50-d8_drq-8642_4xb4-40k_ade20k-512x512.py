# Multi-precision {8,6,4,2} QAT of mmseg's PSPNet R50-D8 on ADE20K (512x512)
# from mmseg's FP32 checkpoint (41.13 mIoU); the recipe of
# deeplabv3_r50-d8_drq-8642_4xb4-40k_ade20k-512x512.py (no paper numbers).
# FP layers (skip_first_last): backbone.stem.0, decode_head.conv_seg and
# auxiliary_head.conv_seg.
_base_ = './deeplabv3_r50-d8_drq-8642_4xb4-40k_ade20k-512x512.py'

model = dict(
    architecture=dict(
        decode_head=dict(
            _delete_=True, type='PSPHead', in_channels=2048, in_index=3,
            channels=512, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
            num_classes=150, norm_cfg=dict(type='SyncBN', requires_grad=True),
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                             loss_weight=1.0))))
load_from = 'https://download.openmmlab.com/mmsegmentation/v0.5/pspnet/pspnet_r50-d8_512x512_80k_ade20k/pspnet_r50-d8_512x512_80k_ade20k_20200615_014128-15a8b914.pth'  # noqa
