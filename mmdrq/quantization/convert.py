"""Convert any nn.Module: Conv2d/Linear -> quantized layers, BN -> per bit.

Only layers whose forward is exactly torch's (plus mmcv's thin wrappers) are
converted; every other conv-like or linear-like layer stays FP and the
conversion table says why, so no model crashes the conversion.
"""
import re
from typing import Dict, List, Optional, Tuple

from mmengine.logging import print_log
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import QuantizeConfig, make_config
from .layers import BitSwitchable, QConv2d, QLinear, QuantLayer
from .switchable_bn import SwitchableBatchNorm, SwitchableNorm, norm_channels

# Last name components of prediction layers in OpenMMLab heads (fc,
# retina_cls, rpn_reg, conv_seg, conv_logits, convs_pred, ...).
_PREDICTION_NAME = re.compile(
    r'^(fc|head)$|(cls|reg|centerness|seg|logits|pred|obj|objectness)$')


def _supported_types() -> Dict[type, type]:
    """Float layer type -> quantized type, for types whose forward is
    exactly torch's (mmcv's wrappers only add empty-input handling)."""
    mapping = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
    try:
        from mmcv.cnn.bricks import wrappers
        mapping[wrappers.Conv2d] = QConv2d
        mapping[wrappers.Linear] = QLinear
    except ImportError:  # mmcv is optional for plain torch models
        pass
    return mapping


def _is_weight_layer(module: nn.Module) -> bool:
    """Conv- or linear-like layers: the ones a user expects to see listed."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return True
    name = type(module).__name__
    return ('Conv' in name or 'Linear' in name) and isinstance(
        getattr(module, 'weight', None), nn.Parameter)


def _prediction_layers(names: List[str]) -> List[str]:
    """Prediction layers: in a ``*head`` module, named like OpenMMLab's
    final layers; if none is found, the last layer of the model."""
    found = []
    for name in names:
        parts = name.split('.')
        if not any(p.endswith('head') for p in parts[:-1]):
            continue
        last = parts[-2] if parts[-1].isdigit() and len(parts) > 1 \
            else parts[-1]
        if _PREDICTION_NAME.search(last):
            found.append(name)
    return found or names[-1:]


def _decide_layers(model: nn.Module, cfg: QuantizeConfig):
    """Decide, for every conv/linear layer, quantize or keep FP (and why)."""
    supported = _supported_types()
    layers = [(n, m) for n, m in model.named_modules()
              if n and _is_weight_layer(m)]
    names = [n for n, _ in layers]
    used = {p: False for p in cfg.skip}
    auto = {}
    if cfg.skip_first_last and names:
        auto[names[0]] = 'first layer (skip_first_last)'
        for n in _prediction_layers(names):
            auto.setdefault(n, 'prediction layer (skip_first_last)')
    decisions = []
    for name, module in layers:
        reason = None
        for pattern in cfg.skip:
            if re.fullmatch(pattern, name):
                used[pattern] = True
                reason = reason or f'matches skip pattern {pattern!r}'
        if type(module) not in supported:
            reason = f'unsupported type {type(module).__name__}'
        reason = reason or auto.get(name)
        decisions.append((name, module, reason))
    # BN layers named by a skip pattern stay FP too.
    for name, module in model.named_modules():
        if isinstance(module, (_BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            for pattern in cfg.skip:
                if re.fullmatch(pattern, name):
                    used[pattern] = True
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise ValueError(
            f'skip pattern(s) {unused} match no layer of '
            f'{type(model).__name__} (patterns are re.fullmatch on names '
            f'such as {names[:3]})')
    return decisions, supported


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _format_table(rows: List[Tuple[str, str, str]]) -> str:
    header = ('layer', 'type', 'status')
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    fmt = ' | '.join('{:<%d}' % w for w in widths)
    lines = [fmt.format(*header), '-+-'.join('-' * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return '\n'.join(lines)


def quantize_model(model: nn.Module, config=None, **kwargs) -> nn.Module:
    """Convert ``model`` in place for multi-precision QAT and return it.

    ``quantize_model(model, bits=[8, 6, 4, 2], skip=['backbone.conv1'])`` or
    ``quantize_model(model, dict(bits=[4, 3, 2]))`` (see QuantizeConfig).
    Supported Conv2d/Linear layers become QConv2d/QLinear that share the
    original parameters; BN layers become SwitchableBatchNorm. Layers kept
    in FP and the reason are logged in a table (and returned in
    ``model.mmdrq_report``). Start the bit at ``bits[0]``.
    """
    cfg = make_config(config, **kwargs)
    _refuse_quantized(model)
    decisions, supported = _decide_layers(model, cfg)
    if all(reason is not None for _, _, reason in decisions):
        found = ', '.join(f'{name} ({reason})'
                          for name, _, reason in decisions)
        raise ValueError(
            f'{type(model).__name__} has nothing to quantize: '
            + (f'every conv/linear layer stays FP: {found}' if decisions else
               'it has no conv or linear layer'))
    rows = []
    for name, module, reason in decisions:
        if reason is None:
            new = supported[type(module)].from_float(
                module, cfg.bits, cfg.weight_quantizer, cfg.act_quantizer)
            _replace(model, name, new)
            status = f'quantized {list(cfg.bits)}'
        else:
            status = f'FP: {reason}'
        rows.append((name, type(module).__name__, status))
    if cfg.switchable_bn or cfg.switchable_gn_ln:
        rows += _convert_bn(model, cfg)
    model.mmdrq_config = cfg
    model.mmdrq_report = rows
    print_log('mmdrq conversion of ' + type(model).__name__ + ':\n' +
              _format_table(rows), logger='current')
    return model


def _refuse_quantized(model: nn.Module):
    """A model, or a part of it, is converted once: a second conversion
    would nest per-bit BNs and mix two bit lists in one model."""
    for name, module in model.named_modules():
        config = getattr(module, 'mmdrq_config', None)
        if config is None and not isinstance(module, BitSwitchable):
            continue
        bits = list(config.bits if config is not None else module.bits)
        where = f'its submodule {name!r} ({type(module).__name__})' \
            if name else 'it'
        raise ValueError(f'{type(model).__name__} is already quantized: '
                         f'{where} has bits={bits}; convert the original '
                         'model once, with one bit list')


def _convert_bn(model: nn.Module, cfg: QuantizeConfig):
    """Switchable BN (``switchable_bn``) and GN/LN (``switchable_gn_ln``)
    for every such norm not named by a skip pattern. Its source is the
    closest preceding conv/linear layer when that layer is quantized and has
    matching channels (a norm fed by an FP layer follows the global bit)."""
    types = {}
    if cfg.switchable_bn:
        types[_BatchNorm] = SwitchableBatchNorm
    if cfg.switchable_gn_ln:
        types[nn.GroupNorm] = types[nn.LayerNorm] = SwitchableNorm
    rows, previous = [], None
    for name, module in list(model.named_modules()):
        if _is_weight_layer(module):  # quantized or kept FP
            previous = (name, module)
            continue
        switchable = next((new for old, new in types.items()
                           if isinstance(module, old)), None)
        if switchable is None:
            continue
        if any(re.fullmatch(p, name) for p in cfg.skip):
            rows.append((name, type(module).__name__, 'FP: skip pattern'))
            continue
        source: Optional[str] = None
        if previous is not None and isinstance(previous[1], QuantLayer) \
                and previous[1].weight.shape[0] == norm_channels(module):
            source = previous[0]
        _replace(model, name, switchable(module, cfg.bits, source))
        kind = 'BN' if switchable is SwitchableBatchNorm else 'norm'
        rows.append((name, type(module).__name__,
                     f'switchable {kind} (follows {source or "global bit"})'))
    return rows
