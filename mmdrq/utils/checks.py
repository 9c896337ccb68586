"""Config values checked before any work, each error naming its key and
the value given (the one wording every option uses)."""
import math
import numbers
from typing import Iterable


def check_choice(key: str, value, choices: Iterable):
    """``value`` if it is one of ``choices``."""
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f'{key} must be one of {choices}, got {value!r}')
    return value


def check_flag(key: str, value) -> bool:
    """``value`` if it is True or False (not 1, 'yes' or None)."""
    if not isinstance(value, bool):
        raise ValueError(f'{key} must be True or False, got {value!r}')
    return value


def check_int(key: str, value, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            value < minimum:
        raise ValueError(f'{key} must be an int >= {minimum}, got {value!r}')
    return value


def check_number(key: str, value, low: float = -math.inf,
                 high: float = math.inf) -> float:
    """``value`` if it is a finite real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f'{key} must be a finite number in [{low}, {high}], '
                         f'got {value!r}')
    return value


def check_positive(key: str, value) -> float:
    """``value`` as a float if it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not 0 < value < math.inf:
        raise ValueError(f'{key} must be a positive number, got {value!r}')
    return float(value)


def check_keys(key: str, cfg: dict, keys: Iterable) -> dict:
    """``cfg`` (a dict option) if each of its keys is one of ``keys``."""
    keys = list(keys)
    unknown = [k for k in cfg if k not in keys]
    if unknown:
        raise ValueError(f'unknown {key} key(s) {unknown} in {dict(cfg)}; '
                         f'valid keys: {keys}')
    return cfg
