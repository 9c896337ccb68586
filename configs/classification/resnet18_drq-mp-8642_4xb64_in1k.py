# Mixed precision (docs/method.md, HASB; SubNet search): ResNet18
# {8,6,4,2} SuperNet with HASB, then SubNets by tools/search_subnet.py;
# the paper's mixed-precision result is 68.85 top-1 at an
# average of 3 bits. Starts from the multi-precision checkpoint of
# resnet18_drq-8642_4xb64_in1k.py (its switchable BNs seed the transitional
# ones) and the traces of tools/hessian.py on it:
#   python tools/hessian.py configs/classification/resnet18_drq-8642_4xb64_in1k.py \
#       work_dirs/resnet18_drq-8642_4xb64_in1k/epoch_90.pth \
#       --out work_dirs/resnet18_drq-8642_4xb64_in1k/traces.json
_base_ = './resnet18_drq-8642_4xb64_in1k.py'

multi_precision_dir = 'work_dirs/resnet18_drq-8642_4xb64_in1k'
model = dict(transitional_bn=dict(input_shape=(1, 3, 224, 224)))
load_from = multi_precision_dir + '/epoch_90.pth'
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces=multi_precision_dir + '/traces.json',
         warmup_epochs=5),
]
