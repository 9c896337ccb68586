# Mixed-precision SuperNet on the digits example: starts from the {8,6,4,2}
# multi-precision checkpoint (load_from=...), transitional BN, and HASB bit
# switching driven by tools/hessian.py traces (custom_hooks[0].traces=...;
# uniform=True instead gives the uniform-switching ablation).
_base_ = './resnet_digits_drq_8642.py'

model = dict(transitional_bn=dict(input_shape=(1, 3, 16, 16)))
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces='work_dirs/digits/traces.json',
         warmup_epochs=1, seed=0),
]
