# Mixed-precision FCOS-R18 (GN head) on the real-image detection set: a HASB
# SuperNet with transitional BN, trained 300 iterations from the
# multi-precision checkpoint of fcos_r18_gn-head_drq-8642_300iters_real.py
# (sigma_t ramps per iteration after a 30-iteration warm-up; BN statistics
# frozen as in that config), then SubNets by tools/search_subnet.py.
#
#     python tools/hessian.py configs/detection/fcos_r18_gn-head_drq-8642_300iters_real.py \
#         work_dirs/fcos_r18_gn-head_drq-8642_300iters_real/iter_300.pth \
#         --out work_dirs/fcos_r18_gn-head_drq-8642_300iters_real/traces.json --num-samples 32
#     python tools/train.py configs/detection/fcos_r18_gn-head_drq-mp-8642_300iters_real.py
#     python tools/search_subnet.py configs/detection/fcos_r18_gn-head_drq-mp-8642_300iters_real.py \
#         work_dirs/fcos_r18_gn-head_drq-mp-8642_300iters_real/iter_300.pth \
#         --kind bitops --input-shape 1 3 96 96
_base_ = './fcos_r18_gn-head_drq-8642_300iters_real.py'

multi_precision_dir = 'work_dirs/fcos_r18_gn-head_drq-8642_300iters_real'
model = dict(transitional_bn=dict(input_shape=(1, 3, 96, 96)))
load_from = multi_precision_dir + '/iter_300.pth'
custom_hooks = [
    dict(type='mmdrq.FreezeBNStatsHook', begin=_base_.max_iters // 2),
    dict(_base_.mmdrq.hasb_hook, traces=multi_precision_dir + '/traces.json',
         warmup_iters=30),
]
