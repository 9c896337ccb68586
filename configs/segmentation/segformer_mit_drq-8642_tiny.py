# A SMALL TEST VARIANT, NOT A BENCHMARK: one-shot {8,6,4,2} Double Rounding
# QAT of a shrunken SegFormer (MiT with 16-channel first stage, one layer
# per stage, random init) on the tiny synthetic ADE20K-layout dataset that
# tools/make_tiny_datasets.py writes (64x64 images; see
# deeplabv3_r18_drq-8642_tiny.py). Its efficient self-attention is
# nn.MultiheadAttention: this run tests that every bit trains and evaluates
# through it; its mIoU numbers mean nothing.
#
#     python tools/make_tiny_datasets.py
#     python tools/train.py configs/segmentation/segformer_mit_drq-8642_tiny.py
#
# Another dataset folder: see configs/_base_/datasets/tiny_ade20k.py.
_base_ = ['mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
          '../_base_/mmdrq_qat.py',
          '../_base_/datasets/tiny_ade20k.py']
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

crop_size = (64, 64)
# SyncBN needs a process group; plain BN runs in one process
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    _base_.mmdrq.model,
    architecture=dict(
        _base_.model,
        data_preprocessor=dict(_base_.model.data_preprocessor,
                               size=crop_size),
        backbone=dict(_base_.model.backbone, embed_dims=16,
                      num_heads=[1, 1, 2, 2], num_layers=[1, 1, 1, 1],
                      drop_path_rate=0.0, init_cfg=None),
        decode_head=dict(_base_.model.decode_head,
                         in_channels=[16, 16, 32, 32], channels=32,
                         norm_cfg=norm_cfg)),
    quantizer=dict(bits=[8, 6, 4, 2]),
    loss_mode='per_bit')

train_dataloader = _base_.tiny_ade20k.train_dataloader
val_dataloader = _base_.tiny_ade20k.val_dataloader
test_dataloader = val_dataloader
val_evaluator = _base_.tiny_ade20k.val_evaluator
test_evaluator = val_evaluator

# ALRS: Adam for everything, the quantization scales' lr scaled per bit
optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='Adam', lr=1e-4, weight_decay=5e-5))
# a constant lr: the stock poly decay spans 80k iterations
param_scheduler = []
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
    checkpoint=dict(
        _base_.mmdrq.checkpoint, by_epoch=False, interval=4,
        max_keep_ckpts=1))
log_processor = dict(by_epoch=False, window_size=1)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
load_from = None
