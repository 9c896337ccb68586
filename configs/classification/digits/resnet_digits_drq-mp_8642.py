# Mixed-precision SuperNet on the digits example: starts from the {8,6,4,2}
# multi-precision checkpoint that tools/digits_example.py writes (load_from),
# transitional BN, and HASB bit switching driven by tools/hessian.py traces
# (custom_hooks[0].traces; uniform=True instead gives the uniform-switching
# ablation). After `python tools/digits_example.py`:
#
#     python tools/hessian.py configs/classification/digits/resnet_digits_drq_8642.py \
#         work_dirs/digits/drq_8642/epoch_10.pth --out work_dirs/digits/traces.json
#     python tools/train.py configs/classification/digits/resnet_digits_drq-mp_8642.py
#     python tools/search_subnet.py configs/classification/digits/resnet_digits_drq-mp_8642.py \
#         work_dirs/resnet_digits_drq-mp_8642/epoch_10.pth --input-shape 1 3 16 16 \
#         --range 2.5 7 --steps 10 --work-dir work_dirs/digits/search
_base_ = './resnet_digits_drq_8642.py'

model = dict(transitional_bn=dict(input_shape=(1, 3, 16, 16)))
load_from = 'work_dirs/digits/drq_8642/epoch_10.pth'
custom_hooks = [
    dict(_base_.mmdrq.hasb_hook, traces='work_dirs/digits/traces.json',
         warmup_epochs=1, seed=0),
]
