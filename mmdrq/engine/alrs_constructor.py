"""Builds the ALRS param group: quantizer scales (and optionally the
no-decay BN/bias params) with weight decay 0, tagged ``alrs=True``."""
from typing import List

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.models import check_optim_bits, unwrap_model
from mmdrq.quantization import model_bits
from mmdrq.quantization.learned_scale import LearnedScaleQuantizer
from mmdrq.registry import OPTIM_WRAPPER_CONSTRUCTORS

ALRS_SCOPES = ('scales', 'scales_norm_bias')


def _alrs_params(model: nn.Module, scope: str) -> List[nn.Parameter]:
    params = [m.scale for m in model.modules()
              if isinstance(m, LearnedScaleQuantizer)]
    if scope == 'scales_norm_bias':
        seen = {id(p) for p in params}
        for module in model.modules():
            own = list(module.named_parameters(recurse=False))
            for name, p in own:
                if id(p) in seen:
                    continue
                if isinstance(module, _BatchNorm) or name == 'bias':
                    params.append(p)
                    seen.add(id(p))
    return params


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ALRSOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor, then the ALRS parameters move to their
    own group (same optimizer settings, weight decay 0, ``alrs=True``).

    ``optim_wrapper.alrs_scope``: ``scales`` (default: weight and activation
    scales) or ``scales_norm_bias`` (also BN affine params and biases, as the
    authors' code does). ``optim_wrapper.bits`` defaults to the model's bits
    and must equal them when given.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.alrs_scope = optim_wrapper_cfg.pop('alrs_scope', 'scales')
        if self.alrs_scope not in ALRS_SCOPES:
            raise ValueError(f'optim_wrapper.alrs_scope must be one of '
                             f'{list(ALRS_SCOPES)}, got {self.alrs_scope!r}')
        optim_wrapper_cfg.setdefault('type', 'mmdrq.ALRSOptimWrapper')
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def __call__(self, model: nn.Module):
        module = unwrap_model(model)
        try:
            bits = model_bits(module)
        except ValueError as e:
            raise ValueError(f'ALRSOptimWrapperConstructor: {e}') from e
        given = self.optim_wrapper_cfg.get('bits')
        if given is not None:
            check_optim_bits(given, bits)
        alrs_ids = {id(p) for p in _alrs_params(module, self.alrs_scope)}
        if not alrs_ids:
            raise ValueError('ALRSOptimWrapperConstructor found no quantizer '
                             'scale parameters in the model')
        groups: List[dict] = []
        self.add_params(groups, module)  # one group per param, paramwise_cfg
        for group in groups:
            if id(group['params'][0]) in alrs_ids:
                group.update(weight_decay=0.0, alrs=True)
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cfg['params'] = _merge_groups(groups)
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg['bits'] = list(bits)
        return OPTIM_WRAPPERS.build(
            wrapper_cfg, default_args=dict(optimizer=optimizer))


def _merge_groups(groups: List[dict]) -> List[dict]:
    """Merge per-parameter groups with equal settings (keeps foreach
    optimizer kernels batched)."""
    merged = {}
    for group in groups:
        key = tuple(sorted((k, v) for k, v in group.items() if k != 'params'))
        merged.setdefault(key, dict(group, params=[]))['params'].extend(
            group['params'])
    return list(merged.values())
