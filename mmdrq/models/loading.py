"""What the QAT wrapper accepts as weights: its own checkpoints, and the
FP32 checkpoint of its bare model as the start of QAT (``load_from``).

MMEngine loads ``load_from`` loosely: tensors of another shape, and keys the
model lacks or does not have, are only logged, and training goes on from
partly random weights. A start checkpoint must fit: every tensor the bare
model has (quantizer state and the per-bit copies aside, which the start
does not have), no other key, the same shapes. A partial start (a backbone
only, another head) is what the model's ``init_cfg`` (``Pretrained``) is for.
"""
from torch import nn

EXTRA_STATE = '_extra_state'  # MultiPrecisionQAT's bits and options
# made by the conversion or the first iterations, not in an FP32 start
_NOT_IN_STARTS = ('_quantizer.', EXTRA_STATE, 'num_batches_tracked')


def accept_start_checkpoints(wrapper: nn.Module):
    """Give ``wrapper`` (a MultiPrecisionQAT) the load hooks below."""
    wrapper._register_load_state_dict_pre_hook(_prefix_bare_checkpoint,
                                               with_module=True)
    wrapper.register_load_state_dict_post_hook(_refuse_misfits)


def _prefix_bare_checkpoint(module, state_dict, prefix, *args):
    """Map a bare model's keys (``backbone.x``) to ``architecture.backbone.x``
    so ``load_from`` can take stock FP32 checkpoints (the wrapper's own keys,
    its children's and its extra state, stay); refuse tensors whose shape
    differs from the model's."""
    keep = tuple(f'{prefix}{name}.' for name in module._modules) + (
        prefix + EXTRA_STATE, )
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(keep):
            state_dict[prefix + 'architecture.' + key[len(prefix):]] = \
                state_dict.pop(key)
    # the architecture's: the wrapper's own tables (PS-KD) grow on load
    own = module.architecture.state_dict(prefix=prefix + 'architecture.',
                                         keep_vars=True)
    misshaped = [f'{key} {tuple(value.shape)} (model: '
                 f'{tuple(own[key].shape)})'
                 for key, value in state_dict.items()
                 if key in own and not key.endswith(EXTRA_STATE) and
                 hasattr(value, 'shape') and
                 tuple(value.shape) != tuple(own[key].shape)]
    if misshaped:
        raise ValueError(
            f'the checkpoint is from another model than the '
            f'{type(module.architecture).__name__} of the config: '
            f'{len(misshaped)} tensors have other shapes, e.g. '
            f'{misshaped[:3]}; refused (a partial start, another head, is '
            "what the model's init_cfg=dict(type='Pretrained', "
            'checkpoint=...) is for)')


def _refuse_misfits(module, incompatible):
    """After the load: keys of the checkpoint that the model does not have,
    or tensors of the architecture (but those no start has) that it lacks
    (the wrapper's own state, PS-KD's tables, is not in a start either)."""
    missing = [k for k in incompatible.missing_keys if 'architecture.' in k
               and not any(part in k for part in _NOT_IN_STARTS)]
    unexpected = list(incompatible.unexpected_keys)
    if not (missing or unexpected):
        return
    found = [f'{len(keys)} {what} (e.g. {keys[:3]})' for what, keys in (
        ('tensors of the model missing', missing),
        ('keys the model does not have', unexpected)) if keys]
    raise ValueError(
        f'the checkpoint is from another model than the '
        f'{type(module.architecture).__name__} of the config: '
        + ', '.join(found) + "; refused (a partial start is what the "
        "model's init_cfg=dict(type='Pretrained', checkpoint=...) is for)")
