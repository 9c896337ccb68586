# Reproduces the paper's table row: ResNet18 {8,6,4,2}:
# 70.74 / 70.71 / 70.43 / 66.35 top-1 at w8/w6/w4/w2 (FP32 69.76).
# One-shot multi-precision QAT with Double Rounding from mmpretrain's FP32
# checkpoint; the stem conv and the classifier stay FP. The paper's recipe:
# Adam, lr 5e-4, weight decay 5e-5 (0 for the quantization scales), cosine,
# 90 epochs, batch 256 in total (4 GPUs x 64), ALRS on the scales. The other
# classification configs inherit this one.
_base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py',
          '../_base_/mmdrq_qat.py']

custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(_base_.mmdrq.model, architecture={{_base_.model}},
             quantizer=dict(bits=[8, 6, 4, 2]))
load_from = 'https://download.openmmlab.com/mmclassification/v0/resnet/resnet18_8xb32_in1k_20210831-fbbb1da6.pth'  # noqa

optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper, mode='fixed',
    optimizer=dict(type='Adam', lr=5e-4, weight_decay=5e-5))
param_scheduler = dict(
    _delete_=True, type='CosineAnnealingLR', T_max=90, by_epoch=True,
    begin=0, end=90)
train_cfg = dict(by_epoch=True, max_epochs=90, val_interval=1)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
train_dataloader = dict(batch_size=64)  # x 4 GPUs = 256
val_dataloader = dict(batch_size=64)
test_dataloader = dict(batch_size=64)
auto_scale_lr = dict(base_batch_size=256)
default_hooks = dict(
    checkpoint=dict(
        _base_.mmdrq.checkpoint, interval=1, max_keep_ckpts=3,
        save_best='accuracy/top1@w2a2', rule='greater'))
