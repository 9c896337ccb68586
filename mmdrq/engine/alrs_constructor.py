"""Builds the ALRS param group: quantizer scales (and optionally the
no-decay BN/bias params) with weight decay 0, tagged ``alrs=True``; and,
optionally, every parameter of named modules (a detection or segmentation
head) with their own weight decay, also tagged ``alrs=True``."""
from typing import List

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdrq.models import architecture_of, check_optim_bits, unwrap_model
from mmdrq.quantization import model_bits
from mmdrq.quantization.learned_scale import LearnedScaleQuantizer
from mmdrq.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmdrq.utils.checks import check_choice

ALRS_SCOPES = ('scales', 'scales_norm_bias')
# norms whose affine params the 'scales_norm_bias' scope takes
NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _scales(model: nn.Module, per_bit_lr: bool) -> List[nn.Parameter]:
    """Quantizer scales updated at each bit's rate (``per_bit_lr``), or
    those quantizing at one fixed bit, which eta_b does not apply to."""
    return [m.scale for m in model.modules()
            if isinstance(m, LearnedScaleQuantizer) and
            m.per_bit_lr == per_bit_lr]


def _alrs_params(model: nn.Module, scope: str) -> List[nn.Parameter]:
    params = _scales(model, True)
    if scope == 'scales_norm_bias':
        seen = {id(p) for p in params + _scales(model, False)}
        for module in model.modules():
            own = list(module.named_parameters(recurse=False))
            for name, p in own:
                if id(p) in seen:
                    continue
                if isinstance(module, NORMS) or name == 'bias':
                    params.append(p)
                    seen.add(id(p))
    return params


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ALRSOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """DefaultOptimWrapperConstructor, then the ALRS parameters move to their
    own group (same optimizer settings, weight decay 0, ``alrs=True``).

    ``optim_wrapper.alrs_scope``: ``scales`` (default: weight and activation
    scales) or ``scales_norm_bias`` (also BN, GN and LN affine params and
    biases, as the authors' code does for BN). ``optim_wrapper.bits`` defaults to the model's bits
    and must equal them when given. An activation scale with a
    ``fixed_bit`` keeps the scheduled lr (weight decay 0): it is one bit's.

    ``optim_wrapper.alrs_modules``: names of modules of the quantized
    architecture (e.g. ``['bbox_head']``) whose parameters also get the
    per-bit lr; they keep their weight decay (docs/lowbit.md).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.alrs_scope = optim_wrapper_cfg.pop('alrs_scope', 'scales')
        check_choice('optim_wrapper.alrs_scope', self.alrs_scope,
                     ALRS_SCOPES)
        self.alrs_modules = optim_wrapper_cfg.pop('alrs_modules', ())
        if not isinstance(self.alrs_modules, (list, tuple)) or not all(
                isinstance(n, str) for n in self.alrs_modules):
            raise ValueError(f'optim_wrapper.alrs_modules must be a list of '
                             f'module names, got {self.alrs_modules!r}')
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
        extra_ids = {id(p) for p in _module_params(module, self.alrs_modules)}
        fixed_ids = {id(p) for p in _scales(module, False)}
        groups: List[dict] = []
        self.add_params(groups, module)  # one group per param, paramwise_cfg
        for group in groups:
            if id(group['params'][0]) in alrs_ids:
                group.update(weight_decay=0.0, alrs=True)
            elif id(group['params'][0]) in extra_ids:
                group.update(alrs=True)
            elif id(group['params'][0]) in fixed_ids:
                group.update(weight_decay=0.0)  # a scale, at the plain lr
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cfg['params'] = _merge_groups(groups)
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = self.optim_wrapper_cfg.copy()
        wrapper_cfg['bits'] = list(bits)
        return OPTIM_WRAPPERS.build(
            wrapper_cfg, default_args=dict(optimizer=optimizer))


def _module_params(model: nn.Module, names) -> List[nn.Parameter]:
    """Parameters of the architecture's modules ``names``; a name that is
    not a module is an error listing the architecture's children."""
    architecture = architecture_of(model)
    params = []
    for name in names:
        try:
            params += list(architecture.get_submodule(name).parameters())
        except AttributeError:
            children = [n for n, _ in architecture.named_children()]
            raise ValueError(
                f'optim_wrapper.alrs_modules entry {name!r} is no module of '
                f'{type(architecture).__name__} (its children: {children})'
            ) from None
    return params


def _merge_groups(groups: List[dict]) -> List[dict]:
    """Merge per-parameter groups with equal settings (keeps foreach
    optimizer kernels batched)."""
    merged = {}
    for group in groups:
        key = tuple(sorted((k, v) for k, v in group.items() if k != 'params'))
        merged.setdefault(key, dict(group, params=[]))['params'].extend(
            group['params'])
    return list(merged.values())
