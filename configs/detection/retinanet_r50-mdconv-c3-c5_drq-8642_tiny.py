# A SMALL TEST VARIANT, NOT A BENCHMARK: the tiny RetinaNet of
# retinanet_r18_drq-8642_tiny.py (same data, schedule and quantization) with
# a DCNv2 backbone as in mmdet's dcnv2 configs: a ResNet-50 at a quarter of
# the width (base 16 channels) whose 3x3 convs of stages 2-4 are modulated
# deformable convs (mmcv's ModulatedDeformConv2dPack, which runs on the CPU).
# Its mAP numbers mean nothing.
#
#     python tools/make_tiny_datasets.py
#     python tools/train.py \
#         configs/detection/retinanet_r50-mdconv-c3-c5_drq-8642_tiny.py
_base_ = './retinanet_r18_drq-8642_tiny.py'

model = dict(
    architecture=dict(
        backbone=dict(
            depth=50, stem_channels=16, base_channels=16,
            dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
            stage_with_dcn=(False, True, True, True)),
        neck=dict(in_channels=[64, 128, 256, 512])))
