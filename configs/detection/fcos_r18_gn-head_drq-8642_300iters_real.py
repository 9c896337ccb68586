# fcos_r18_gn-head_drq-8642_real.py trained three times as long (300
# iterations, the cosine stretched to match), every BN's statistics
# updated for the first half and frozen for the second: the recommended
# schedule (benchmark row freeze_bn_stats_late_long_qat, docs/lowbit.md).
#
#     python tools/train.py configs/detection/fcos_r18_gn-head_drq-8642_300iters_real.py \
#         --cfg-options load_from=work_dirs/fcos_r18_gn-head_fp32_real/iter_1000.pth
_base_ = './fcos_r18_gn-head_drq-8642_real.py'

max_iters = 300
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
# validation stays every 100 iterations
train_cfg = dict(max_iters=max_iters)
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=max_iters // 2)]
