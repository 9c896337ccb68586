# Reproduces the paper's table row: ResNet50 {8,6,4,2}:
# 76.51 / 76.28 / 75.74 / 72.31 top-1 at w8/w6/w4/w2 (FP32 76.13).
# Same recipe as resnet18_drq-8642_4xb64_in1k.py, mmpretrain's ResNet-50.
_base_ = './resnet18_drq-8642_4xb64_in1k.py'

model = dict(
    architecture=dict(
        backbone=dict(depth=50), head=dict(in_channels=2048)))
load_from = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet50_8xb32_in1k_20210831-ea4938fc.pth'  # noqa
