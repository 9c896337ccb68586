# fcn_r18-d8_drq-8642_real.py trained three times as long (300 iterations,
# the cosine stretched to match): the recommended schedule, whose w2a2 is
# within 2 mIoU of FP32 (benchmark row freeze_bn_stats_long_qat,
# docs/lowbit.md).
#
#     python tools/train.py configs/segmentation/fcn_r18-d8_drq-8642_300iters_real.py \
#         --cfg-options load_from=work_dirs/fcn_r18-d8_fp32_real/iter_1000.pth
_base_ = './fcn_r18-d8_drq-8642_real.py'

max_iters = 300
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
# validation stays every 100 iterations
train_cfg = dict(max_iters=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
