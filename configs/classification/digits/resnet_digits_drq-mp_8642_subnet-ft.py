# Fine-tunes one SubNet of the digits SuperNet (mmdrq.SubNetFineTuneHook; not
# in the paper): a few epochs at the SubNet's own per-layer bits, one step
# per iteration, from the SuperNet checkpoint, at a hundredth of the QAT's
# learning rate (a fresh Adam at its full rate lost 1-5 points on digits);
# validated and tested at that SubNet. The result is the SubNet's own
# checkpoint. After the commands in
# resnet_digits_drq-mp_8642.py's header:
#
#     python tools/train.py configs/classification/digits/resnet_digits_drq-mp_8642_subnet-ft.py
#     python tools/test.py configs/classification/digits/resnet_digits_drq-mp_8642_subnet-ft.py \
#         work_dirs/resnet_digits_drq-mp_8642_subnet-ft/epoch_2.pth
_base_ = './resnet_digits_drq-mp_8642.py'

subnet = 'work_dirs/digits/search/subnet_avg_bits_4.json'
model = dict(bit_schedule=dict(kind='random', num_sampled=0))
load_from = 'work_dirs/resnet_digits_drq-mp_8642/epoch_10.pth'
custom_hooks = [dict(type='mmdrq.SubNetFineTuneHook', subnet=subnet)]
optim_wrapper = dict(optimizer=dict(lr=5e-6))
epochs = 2
param_scheduler = dict(type='CosineAnnealingLR', T_max=epochs, by_epoch=True)
train_cfg = dict(max_epochs=epochs, val_interval=epochs)
val_cfg = dict(bits=[], subnets=[subnet])
test_cfg = dict(bits=[], subnets=[subnet])
default_hooks = dict(checkpoint=dict(interval=epochs, save_best=None))
