# One-shot {8,6,4,2} Double Rounding QAT of the real-image deployment
# benchmark's Faster R-CNN-R18 FPN, from the FP32 checkpoint of
# faster-rcnn_r18_fpn_fp32_real.py (a stock checkpoint of the bare model
# loads into the wrapper as is), with ALRS; CocoMetric at every bit. The
# recipe of the FCOS one, fcos_r18_gn-head_drq-8642_300iters_real.py (on
# top of fcos_r18_gn-head_drq-8642_real.py), in one file: 300 iterations,
# cosine, every BN's statistics updated for the first half and frozen for
# the second (benchmark row freeze_bn_stats_late_long_qat, docs/lowbit.md).
# Of the FCOS config's quantizer options only act_quantizer
# init_method='mse' (activation scales start at least quantization MSE)
# is kept; switchable_gn_ln=False is left out, as Faster R-CNN has no
# GroupNorm or LayerNorm for it to act on (every norm is BN, switchable
# per bit). FP layers (skip_first_last): backbone.conv1 and the prediction
# layers rpn_head.rpn_cls / rpn_reg and roi_head.bbox_head.fc_cls / fc_reg.
#
#     python tools/train.py configs/detection/faster-rcnn_r18_fpn_drq-8642_300iters_real.py \
#         --cfg-options load_from=work_dirs/faster-rcnn_r18_fpn_fp32_real/iter_1000.pth
#     python tools/test.py configs/detection/faster-rcnn_r18_fpn_drq-8642_300iters_real.py \
#         work_dirs/faster-rcnn_r18_fpn_drq-8642_300iters_real/iter_300.pth
#     python tools/export_onnx.py configs/detection/faster-rcnn_r18_fpn_drq-8642_300iters_real.py \
#         work_dirs/faster-rcnn_r18_fpn_drq-8642_300iters_real/iter_300.pth \
#         --out-dir work_dirs/faster-rcnn_r18_fpn_drq-8642_300iters_real/onnx
_base_ = ['./faster-rcnn_r18_fpn_fp32_real.py', '../_base_/mmdrq_qat.py']

model = dict(
    _base_.mmdrq.model,
    architecture={{_base_.model}},
    quantizer=dict(bits=[8, 6, 4, 2],
                   act_quantizer=dict(init_method='mse')),
    loss_mode='per_bit')

# the paper's recipe: Adam, weight decay 5e-5 (0 for the quantization
# scales), cosine; ALRS scales the scales' lr per bit
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=2e-4, weight_decay=5e-5))
max_iters = 300
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters),
]
# validation every 100 iterations, as the FCOS one
train_cfg = dict(max_iters=max_iters, val_interval=100)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [dict(type='mmdrq.FreezeBNStatsHook', begin=max_iters // 2)]
