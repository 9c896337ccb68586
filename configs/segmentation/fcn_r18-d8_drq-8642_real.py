# One-shot {8,6,4,2} Double Rounding QAT of the low-bit segmentation
# benchmark's FCN-R18-D8, from the FP32 checkpoint of
# fcn_r18-d8_fp32_real.py (a stock checkpoint of the bare model loads
# into the wrapper as is), with ALRS; IoUMetric at every bit.
#
#     python tools/train.py configs/segmentation/fcn_r18-d8_drq-8642_real.py \
#         --cfg-options load_from=work_dirs/fcn_r18-d8_fp32_real/iter_1000.pth
#     python tools/test.py configs/segmentation/fcn_r18-d8_drq-8642_real.py \
#         work_dirs/fcn_r18-d8_drq-8642_real/iter_100.pth
#
# 100 iterations: the base of the low-bit benchmark's rows.
# fcn_r18-d8_drq-8642_300iters_real.py trains three times as long,
# the recommended schedule (docs/lowbit.md).
_base_ = ['./fcn_r18-d8_fp32_real.py', '../_base_/mmdrq_qat.py']

model = dict(
    _base_.mmdrq.model,
    architecture={{_base_.model}},
    # activation scales start at least quantization MSE (LSQ+): the 99.9th
    # percentile init left w2a2 far below FP (docs/lowbit.md)
    quantizer=dict(bits=[8, 6, 4, 2],
                   act_quantizer=dict(init_method='mse')),
    loss_mode='per_bit')

# the paper's recipe: Adam, weight decay 5e-5 (0 for the quantization
# scales), cosine; ALRS scales the scales' lr per bit
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=2e-4, weight_decay=5e-5))
max_iters = 100
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(checkpoint=dict(interval=max_iters))
# every bit's BN copies keep the FP32 statistics (Fully Quantized Network's
# BN freezing); their affine parameters learn per bit (docs/lowbit.md)
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=0)]
