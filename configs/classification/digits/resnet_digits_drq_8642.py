# One-shot {8,6,4,2} Double Rounding QAT of the digits ResNet, starting from
# its FP32 checkpoint (pass --cfg-options load_from=<FP32 checkpoint>; a
# stock FP32 checkpoint of the bare model loads into the wrapper as is).
_base_ = ['./resnet_digits_fp32.py',
          '../../_base_/mmdrq_qat.py']

custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

model = dict(
    _base_.mmdrq.model,
    architecture={{_base_.model}},
    quantizer=dict(bits=[8, 6, 4, 2]),
    loss_mode='per_bit')

# The paper's recipe at this scale: Adam 5e-4, weight decay 5e-5 (0 for the
# quantization scales), cosine; ALRS scales the scales' lr per bit.
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=5e-4, weight_decay=5e-5))
param_scheduler = dict(type='CosineAnnealingLR', T_max=10, by_epoch=True)
train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=10)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(
    checkpoint=dict(
        _base_.mmdrq.checkpoint, interval=5, max_keep_ckpts=2,
        save_best='accuracy/top1@w2a2', rule='greater'))
