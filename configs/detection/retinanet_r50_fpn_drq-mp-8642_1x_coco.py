# Mixed-precision RetinaNet R50-FPN: HASB SuperNet with transitional BN from
# the multi-precision checkpoint of retinanet_r50_fpn_drq-8642_1x_coco.py and
# its tools/hessian.py traces, then tools/search_subnet.py (e.g. --kind
# bitops --input-shape 1 3 800 1333). No paper numbers to match.
_base_ = './retinanet_r50_fpn_drq-8642_1x_coco.py'

multi_precision_dir = 'work_dirs/retinanet_r50_fpn_drq-8642_1x_coco'
model = dict(transitional_bn=dict(input_shape=(1, 3, 256, 256)))
load_from = multi_precision_dir + '/epoch_12.pth'
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces=multi_precision_dir + '/traces.json',
         warmup_epochs=1),
]
