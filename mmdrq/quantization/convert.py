"""Convert any nn.Module: conv, linear and attention layers -> quantized
layers, BN -> per bit.

Only layer types with a form are converted (forms.py, one table); every
other conv-like or linear-like layer stays FP and the conversion table says
why, so no model crashes the conversion.
"""
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from mmengine.logging import print_log
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import QuantizeConfig, make_config
from .attention import MultiheadAttentionLayer
from .forms import is_weight_layer, layer_forms
from .layers import BitSwitchable, QuantLayer
from .owner_reads import WeightReadingOwner, weight_reads
from .report import (FIRST_LAYER, FP, PREDICTION_LAYER, QUANTIZED,
                     ConversionRow, format_report)
from .switchable_bn import SwitchableBatchNorm, SwitchableNorm, norm_channels

# Last name components of prediction layers in OpenMMLab heads (fc,
# retina_cls, rpn_reg, conv_seg, conv_logits, convs_pred, ...).
_PREDICTION_NAME = re.compile(
    r'^(fc|head)$|(cls|reg|centerness|seg|logits|pred|obj|objectness)$')


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
    supported = layer_forms()
    layers = [(n, m) for n, m in model.named_modules()
              if n and (is_weight_layer(m) or cfg.embeddings and
                        type(m) is nn.Embedding)]
    names = [n for n, _ in layers]
    used = {p: False for p in cfg.skip}
    auto = {}
    if cfg.skip_first_last and names:
        auto[names[0]] = FIRST_LAYER
        for n in _prediction_layers(_outside_teachers(model, names)):
            auto.setdefault(n, PREDICTION_LAYER)
        for name, reason in list(auto.items()):
            for twin in _twins(model, name):
                auto.setdefault(twin, f'{reason[:-1]} of a copy)')
    decisions = []
    for name, module in layers:
        reason = None
        for pattern in cfg.skip:
            if re.fullmatch(pattern, name):
                used[pattern] = True
                reason = reason or f'matches skip pattern {pattern!r}'
        if type(module) not in supported:
            reason = f'unsupported type {type(module).__name__}'
        else:
            check = getattr(supported[type(module)], 'unsupported_reason',
                            None)
            reason = (check and check(module)) or reason
        by_default = reason is None and name in auto
        reason = reason or auto.get(name)
        decisions.append((name, module, reason, by_default))
    decisions = _out_proj_follows_attention(decisions)
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


def _outside_teachers(model: nn.Module, names: List[str]) -> List[str]:
    """``names`` without the layers of MMEngine's averaged models: an EMA
    teacher registered last does not hold the model's prediction layer."""
    from mmengine.model import BaseAveragedModel
    teachers = tuple(n + '.' for n, m in model.named_modules()
                     if isinstance(m, BaseAveragedModel))
    return [n for n in names if not n.startswith(teachers)] or names


def _twins(model: nn.Module, name: str) -> List[str]:
    """The layer at the same place in every other instance of the class of
    ``name``'s top-level owner: a momentum teacher (BYOL's ``target_net``,
    CAE's ``teacher``) is converted as its student, so that the student's
    parameters still map onto it by name and by order."""
    top, _, rest = name.partition('.')
    if not rest:
        return []
    owner = model.get_submodule(top)
    shape = model.get_submodule(name).weight.shape
    found = []
    for other_name, other in model.named_modules():
        if type(other) is not type(owner) or other is owner:
            continue
        twin = f'{other_name}.{rest}'
        try:
            layer = model.get_submodule(twin)
        except AttributeError:
            continue
        if getattr(getattr(layer, 'weight', None), 'shape', None) == shape:
            found.append(twin)
    return found


def _refresh_averaged_models(model: nn.Module):
    """MMEngine's averaged models (EMA teachers) list the parameters they
    average when built; conversion replaced those, so list them again (the
    new quantizer scales included) and keep them out of the optimizer."""
    from mmengine.model import BaseAveragedModel
    for module in model.modules():
        if isinstance(module, BaseAveragedModel):
            module.module.requires_grad_(False)
            module.avg_parameters = module.module.state_dict() \
                if module.update_buffers else \
                dict(module.module.named_parameters())


def _out_proj_follows_attention(decisions):
    """The out_proj of a MultiheadAttention kept FP stays FP too: torch's
    attention reads its weight and never calls it."""
    fp_attention = [name for name, module, reason, _ in decisions
                    if reason is not None and
                    isinstance(module, nn.MultiheadAttention)]
    result = []
    for name, module, reason, by_default in decisions:
        owner = name.rpartition('.')[0]
        if reason is None and owner in fp_attention and \
                name.endswith('.out_proj'):
            reason = f'out_proj of {owner}, which stays FP'
        result.append((name, module, reason, by_default))
    return result


def _replace_all(model: nn.Module, new_of: Dict[int, nn.Module]):
    """Replace every reference to a converted module (by identity: a conv
    shared between heads, RTMDet's ``share_conv``, is one object under
    several names) by its quantized form."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            new = new_of.get(id(child))
            if new is not None and new is not child:
                setattr(parent, child_name, new)


# a structural pass after the conversion: (name, pass(model) -> rows)
ConversionPass = Tuple[str, Callable[[nn.Module], List[ConversionRow]]]


def quantize_model(model: nn.Module, config=None,
                   passes: Sequence[ConversionPass] = (),
                   **kwargs) -> nn.Module:
    """Convert ``model`` in place for multi-precision QAT and return it.

    ``quantize_model(model, bits=[8, 6, 4, 2], skip=['backbone.conv1'])`` or
    ``quantize_model(model, dict(bits=[4, 3, 2]))`` (see QuantizeConfig).
    Supported Conv2d/Linear layers become QConv2d/QLinear that share the
    original parameters; BN layers become SwitchableBatchNorm; then each
    of ``passes`` runs in order (the wrapper's per-level norms and scales,
    transitional BN). Every decision is a ``ConversionRow`` in
    ``model.mmdrq_report``, logged as one table. Start the bit at
    ``bits[0]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'quantize_model takes a torch.nn.Module (an '
                        f'OpenMMLab model built from its config), got '
                        f'{type(model).__name__} {model!r}')
    cfg = make_config(config, **kwargs)
    _refuse_quantized(model)
    decisions, supported = _decide_layers(model, cfg)
    if all(reason is not None for _, _, reason, _ in decisions):
        found = ', '.join(f'{name} ({reason})'
                          for name, _, reason, _ in decisions)
        raise ValueError(
            f'{type(model).__name__} has nothing to quantize: '
            + (f'every conv/linear layer stays FP: {found}' if decisions else
               'it has no conv or linear layer'))
    rows, new_of = [], {}
    for name, module, reason, by_default in decisions:
        float_type = type(module).__name__
        if reason is None:
            new = new_of[id(module)] = supported[type(module)].from_float(
                module, cfg.bits, cfg.weight_quantizer, cfg.act_quantizer)
            if cfg.attention_matmuls and \
                    isinstance(new, MultiheadAttentionLayer):
                new.quantize_matmuls(cfg.act_quantizer)
            rows.append(ConversionRow(name, float_type, QUANTIZED,
                                      str(list(cfg.bits))))
        else:
            rows.append(ConversionRow(name, float_type, FP, reason,
                                      by_default))
    _replace_all(model, new_of)
    rows += _convert_weight_readers(model)
    if cfg.switchable_bn or cfg.switchable_gn_ln:
        rows += _convert_bn(model, cfg)
    model.mmdrq_config = cfg
    for _, run_pass in passes:
        rows += run_pass(model)
    _refresh_averaged_models(model)
    model.mmdrq_report = rows
    print_log('mmdrq conversion of ' + type(model).__name__ + ':\n' +
              format_report(rows), logger='current')
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
    rows, previous, first_name, new_of = [], None, {}, {}
    forms = layer_forms()
    # every reference: a norm after a shared conv's later use follows it
    for name, module in list(model.named_modules(remove_duplicate=False)):
        repeated = id(module) in first_name
        name = first_name.setdefault(id(module), name)
        if is_weight_layer(module):  # quantized or kept FP
            if previous is None or \
                    not _feeds_input(previous, name, forms):
                previous = (name, module)
            continue
        switchable = next((new for old, new in types.items()
                           if isinstance(module, old)), None)
        if repeated or switchable is None:
            continue
        if any(re.fullmatch(p, name) for p in cfg.skip):
            rows.append(ConversionRow(name, type(module).__name__, FP,
                                      'skip pattern'))
            continue
        source: Optional[str] = None
        if previous is not None and isinstance(previous[1], QuantLayer) \
                and _output_channels(previous[1]) == norm_channels(module):
            source = previous[0]
        new_of[id(module)] = switchable(module, cfg.bits, source)
        kind = 'switchable ' + (
            'BN' if switchable is SwitchableBatchNorm else 'norm')
        rows.append(ConversionRow(
            name, type(module).__name__, kind,
            f'{kind} (follows {source or "global bit"})'))
    _replace_all(model, new_of)
    return rows


def _feeds_input(owner: Tuple[str, nn.Module], name: str,
                 forms: Dict[type, type]) -> bool:
    """Whether the layer ``name`` is one of the ``input_layers`` of the
    layer ``owner`` (name, module), converted or not (a DCN Pack's
    ``conv_offset``): it feeds the owner, not the norm after it."""
    owner_name, module = owner
    inputs = getattr(module, 'input_layers', None) or getattr(
        forms.get(type(module)), 'input_layers', ())
    prefix = owner_name + '.' if owner_name else ''
    return any(name == prefix + child for child in inputs)


def _convert_weight_readers(model: nn.Module) -> list:
    """Owners whose code reads a quantized child's weight directly
    (``F.linear(x, self.qkv.weight)``) read its quantized weight in their
    forward (``WeightReadingOwner``); a table row names what they read."""
    rows = []
    for name, owner in list(model.named_modules()):
        if isinstance(owner, (QuantLayer, WeightReadingOwner)):
            continue
        reads = [child for child in weight_reads(owner)
                 if isinstance(owner.get_submodule(child), QuantLayer)]
        if reads:
            rows.append(ConversionRow(
                name or '(model)', type(owner).__name__, 'weight reads',
                f'reads {", ".join(c + ".weight" for c in reads)} '
                'directly: quantized weight, FP input'))
            WeightReadingOwner.from_owner(owner, reads)
    return rows


def _output_channels(layer: QuantLayer) -> int:
    """Output channels of a quantized layer (dim 0 of the weight its
    quantizer sees)."""
    with torch.no_grad():
        return layer.weight_to_quantize().shape[0]
