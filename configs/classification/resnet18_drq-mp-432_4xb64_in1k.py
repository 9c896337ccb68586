# Mixed precision {4,3,2} variant of resnet18_drq-mp-8642_4xb64_in1k.py
# (HASB SuperNet, then tools/search_subnet.py), from the {4,3,2}
# multi-precision checkpoint and its traces. The paper gives no mixed
# {4,3,2} row; its mixed-precision ResNet18 result is 68.85 at 3 bits.
_base_ = './resnet18_drq-mp-8642_4xb64_in1k.py'

multi_precision_dir = 'work_dirs/resnet18_drq-432_4xb64_in1k'
model = dict(quantizer=dict(bits=[4, 3, 2]))
load_from = multi_precision_dir + '/epoch_90.pth'
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces=multi_precision_dir + '/traces.json',
         warmup_epochs=5),
]
