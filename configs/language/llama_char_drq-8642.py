# One-shot {8,6,4,2} Double Rounding QAT of llama_char_fp32.py's LM, from
# its checkpoint, ALRS on the weight scales; weight-only (activations float,
# as LM deployment runs them), the LM head and the embeddings FP.
# Validation loss and perplexity at every bit (lm/loss@w4a4, ...; the tag
# names the bit, activations stay float).
#
#     python tools/train.py configs/language/llama_char_drq-8642.py \
#         --cfg-options load_from=work_dirs/llama_char_fp32/iter_2000.pth
#     python tools/test.py configs/language/llama_char_drq-8642.py \
#         work_dirs/llama_char_drq-8642/iter_500.pth
_base_ = ['./llama_char_fp32.py', '../_base_/mmdrq_qat.py']

model = dict(
    _base_.mmdrq.model,
    architecture={{_base_.model}},
    # every Linear of the decoder; the LM head stays FP (quantize it too:
    # model.quantizer.skip=[]); embeddings are lookups, not quantized
    quantizer=dict(bits=[8, 6, 4, 2], act_quantizer=None,
                   skip_first_last=False, skip=[r'lm\.lm_head']))

optim_wrapper = dict(
    _base_.mmdrq.optim_wrapper,
    mode='fixed',
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.0),
    clip_grad=dict(max_norm=1.0))
max_iters = 500
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters,
         eta_min=5e-6),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
val_cfg = _base_.mmdrq.val_cfg
test_cfg = _base_.mmdrq.test_cfg
default_hooks = dict(checkpoint=dict(interval=max_iters))
