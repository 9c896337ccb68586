# mmdrq's parts of a multi-precision QAT config, listed beside the stock
# config it quantizes:
#
#     _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
#               '../_base_/mmdrq_qat.py']
#     model = dict(_base_.mmdrq.model, architecture={{_base_.model}},
#                  quantizer=dict(bits=[8, 6, 4, 2]))
#     optim_wrapper = dict(_base_.mmdrq.optim_wrapper, optimizer=...)
#     val_cfg = _base_.mmdrq.val_cfg
#     test_cfg = _base_.mmdrq.test_cfg
#
# Why a namespace and not `model = ...` here: MMEngine (0.10.7) refuses a key
# that two bases both define ("Duplicate key is not allowed among bases"),
# and the stock config defines model, optim_wrapper, val_cfg, test_cfg and
# default_hooks. So this file only adds keys no stock config has:
# model_wrapper_cfg, and `mmdrq`, whose parts the config puts in place. Each
# part that replaces a stock one carries _delete_=True. `mmdrq` stays in the
# final config as an unused key.
model_wrapper_cfg = dict(type='mmdrq.MultiPrecisionQATDDP')

mmdrq = dict(
    # the wrapper; the config adds architecture= (the stock model) and bits
    model=dict(_delete_=True, type='mmdrq.MultiPrecisionQAT'),
    # ALRS: the quantization scales' lr scaled per bit; the config adds its
    # optimizer (and mode, clip_grad)
    optim_wrapper=dict(
        _delete_=True,
        type='mmdrq.ALRSOptimWrapper',
        constructor='mmdrq.ALRSOptimWrapperConstructor'),
    # validation and test at every bit of the model (metric@w4a4, ...)
    val_cfg=dict(_delete_=True, type='mmdrq.MultiBitValLoop'),
    test_cfg=dict(_delete_=True, type='mmdrq.MultiBitTestLoop'),
    # default_hooks.checkpoint: written atomically (interval etc. are the
    # config's own)
    checkpoint=dict(type='mmdrq.AtomicCheckpointHook'),
    # mixed precision: HASB bit switching; the config adds traces= and
    # warmup_epochs=
    hasb_hook=dict(type='mmdrq.HASBHook', sigma=0.5))
