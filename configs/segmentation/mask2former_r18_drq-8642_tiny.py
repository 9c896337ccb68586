# A SMALL TEST VARIANT, NOT A BENCHMARK: one-shot {8,6,4,2} Double Rounding
# QAT of a shrunken Mask2Former for semantic segmentation (ResNet-18,
# 64-channel pixel decoder with one deformable-attention encoder layer,
# three transformer decoder layers, 10 queries, random init, plain BN) on
# the tiny synthetic ADE20K-layout dataset that tools/make_tiny_datasets.py
# writes (64x64 images; see deeplabv3_r18_drq-8642_tiny.py). Its attention
# layers are mmcv's MultiScaleDeformableAttention (pytorch fallback on the
# CPU) and nn.MultiheadAttention: this run tests that every bit trains and
# evaluates through them; its mIoU numbers mean nothing.
#
#     python tools/make_tiny_datasets.py
#     python tools/train.py \
#         configs/segmentation/mask2former_r18_drq-8642_tiny.py
#
# Another dataset folder: see configs/_base_/datasets/tiny_ade20k.py.
_base_ = ['mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py',
          '../_base_/mmdrq_qat.py',
          '../_base_/datasets/tiny_ade20k.py']
custom_imports = dict(imports=['mmdrq'], allow_failed_imports=False)

crop_size = (64, 64)
# SyncBN needs a process group; plain BN runs in one process
norm_cfg = dict(type='BN', requires_grad=True)

_dims = 64
_head = _base_.model.decode_head
_pixel = _head.pixel_decoder
_decoder = _head.transformer_decoder
_attn = dict(embed_dims=_dims, num_heads=8)
_ffn = dict(embed_dims=_dims, feedforward_channels=128)
model = dict(
    _base_.mmdrq.model,
    architecture=dict(
        _base_.model,
        data_preprocessor=dict(_base_.model.data_preprocessor,
                               size=crop_size),
        backbone=dict(_base_.model.backbone, depth=18, norm_cfg=norm_cfg,
                      init_cfg=None),
        decode_head=dict(
            _head,
            in_channels=[64, 128, 256, 512],
            feat_channels=_dims,
            out_channels=_dims,
            num_queries=10,
            pixel_decoder=dict(
                _pixel,
                encoder=dict(_pixel.encoder, num_layers=1, layer_cfg=dict(
                    self_attn_cfg=dict(_pixel.encoder.layer_cfg.self_attn_cfg,
                                       **_attn),
                    ffn_cfg=dict(_pixel.encoder.layer_cfg.ffn_cfg, **_ffn))),
                positional_encoding=dict(num_feats=_dims // 2,
                                         normalize=True)),
            positional_encoding=dict(num_feats=_dims // 2, normalize=True),
            transformer_decoder=dict(
                _decoder,
                num_layers=3,
                layer_cfg=dict(
                    self_attn_cfg=dict(_decoder.layer_cfg.self_attn_cfg,
                                       **_attn),
                    cross_attn_cfg=dict(_decoder.layer_cfg.cross_attn_cfg,
                                        **_attn),
                    ffn_cfg=dict(_decoder.layer_cfg.ffn_cfg, **_ffn))),
            train_cfg=dict(_head.train_cfg, num_points=256))),
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
    # save_best=None: the stock 'mIoU' is logged per bit (mIoU@w8a8, ...)
    checkpoint=dict(
        _base_.mmdrq.checkpoint, by_epoch=False, interval=4,
        max_keep_ckpts=1, save_best=None))
log_processor = dict(by_epoch=False, window_size=1)
env_cfg = dict(cudnn_benchmark=False)
randomness = dict(seed=0)
load_from = None
