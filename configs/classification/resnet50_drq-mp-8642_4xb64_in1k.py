# Mixed precision (docs/method.md, HASB; SubNet search): ResNet50
# {8,6,4,2} SuperNet with HASB, then SubNets by tools/search_subnet.py;
# the paper's mixed-precision result is 75.06 top-1 at an
# average of 3 bits. Needs the multi-precision checkpoint of
# resnet50_drq-8642_4xb64_in1k.py and tools/hessian.py traces of it.
_base_ = './resnet50_drq-8642_4xb64_in1k.py'

multi_precision_dir = 'work_dirs/resnet50_drq-8642_4xb64_in1k'
model = dict(transitional_bn=dict(input_shape=(1, 3, 224, 224)))
load_from = multi_precision_dir + '/epoch_90.pth'
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces=multi_precision_dir + '/traces.json',
         warmup_epochs=5),
]
