"""The options of a conversion, as one small dataclass checked on creation."""
import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Optional, Tuple

from mmdrq.utils.checks import check_flag
from .bitwidths import check_bits


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """What ``quantize_model`` does to a model.

    Args:
        bits: bit-widths, highest first; ``bits[0]`` is the stored precision.
        skip: regular expressions (``re.fullmatch`` on module names) of
            layers to keep in FP; each must match at least one layer.
        skip_first_last: also keep the first layer and the prediction layers
            in FP (docs/method.md, Which layers are quantized).
        weight_quantizer: config of the weight quantizer
            (``DoubleRoundingQuantizer`` options).
        act_quantizer: config of the input quantizer, or None for
            weight-only quantization.
        switchable_bn: replace BN layers by one BN per bit.
        switchable_gn_ln: replace GroupNorm and LayerNorm layers by one copy
            per bit too (``SwitchableNorm``; docs/lowbit.md). On by default
            for the reason BN is: each bit's own affine parameters; FP and
            older checkpoints load, their one norm going to every bit.
        attention_matmuls: also quantize the inputs of attention's two
            products (q, k, the softmax output, v), each with a per-bit act
            quantizer of its own; off by default (the paper quantizes conv
            and linear layers).
        embeddings: also quantize ``nn.Embedding`` tables (a scale per
            row; the lookup's ids are not quantized): a language model's
            token embeddings. Off by default (the paper quantizes conv
            and linear layers).
    """
    bits: Tuple[int, ...] = (8, 6, 4, 2)
    skip: Tuple[str, ...] = ()
    skip_first_last: bool = True
    weight_quantizer: dict = dataclasses.field(
        default_factory=lambda: dict(type='DoubleRoundingQuantizer'))
    act_quantizer: Optional[dict] = dataclasses.field(
        default_factory=lambda: dict(type='ActQuantizer'))
    switchable_bn: bool = True
    switchable_gn_ln: bool = True
    attention_matmuls: bool = False
    embeddings: bool = False

    def __post_init__(self):
        object.__setattr__(self, 'bits', check_bits(self.bits))
        object.__setattr__(self, 'skip', _check_skip(self.skip))
        for key in ('skip_first_last', 'switchable_bn', 'switchable_gn_ln',
                    'attention_matmuls', 'embeddings'):
            check_flag(key, getattr(self, key))
        for key in ('weight_quantizer', 'act_quantizer'):
            value = getattr(self, key)
            if value is None and key == 'act_quantizer':
                continue
            if not isinstance(value, dict):
                raise ValueError(f'{key} must be a dict config, got {value!r}')
            if 'bits' in value:
                raise ValueError(
                    f'{key}.bits={value["bits"]} must not be set: the '
                    f'quantizer takes bits={list(self.bits)} from the config')
            value = dict(value)
            value.setdefault('type', 'DoubleRoundingQuantizer'
                             if key == 'weight_quantizer' else 'ActQuantizer')
            object.__setattr__(self, key, value)

    @classmethod
    def from_dict(cls, cfg: dict) -> 'QuantizeConfig':
        """Build from a (config) dict; an unknown key is an error that names
        it and the closest valid key."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in cfg:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f' (did you mean {close[0]!r}?)' if close else ''
                raise KeyError(f'unknown quantizer config key {key!r}{hint}; '
                               f'valid keys: {fields}')
        return cls(**{k: _plain(v) for k, v in cfg.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_skip(skip) -> Tuple[str, ...]:
    """``skip`` as a tuple of patterns, each a valid regular expression."""
    patterns = (skip, ) if isinstance(skip, str) else skip
    if not isinstance(patterns, (list, tuple)):
        raise ValueError(f'skip must be a list of regular expressions, got '
                         f'{skip!r}')
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f'skip must hold regular expressions (strings),'
                             f' got {pattern!r} in {skip!r}')
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f'skip pattern {pattern!r} is not a valid '
                             f'regular expression: {e}') from None
    return tuple(patterns)


def _plain(value):
    """ConfigDict / list -> plain dict / tuple, so configs compare and save."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def make_config(config=None, **kwargs) -> QuantizeConfig:
    """A QuantizeConfig from a QuantizeConfig, a dict, keyword args or both."""
    if isinstance(config, QuantizeConfig):
        if kwargs:
            config = dataclasses.replace(config, **kwargs)
        return config
    if config is not None and not isinstance(config, Mapping):
        hint = ' (the bit list goes as bits=[...])' \
            if isinstance(config, (list, tuple, int)) else ''
        raise TypeError(f'config must be a QuantizeConfig or a dict, got '
                        f'{type(config).__name__} {config!r}{hint}')
    cfg = dict(config or {})
    cfg.update(kwargs)
    return QuantizeConfig.from_dict(cfg)

