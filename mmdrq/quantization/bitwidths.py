"""Validation of bit-width lists, the integer ranges they imply, and the
names of settings in log and metric keys."""
import numbers
from typing import Iterable, Tuple

MIN_BIT = 2
MAX_BIT = 16


def check_bits(bits: Iterable[int], key: str = 'bits') -> Tuple[int, ...]:
    """Return ``bits`` as a tuple after checking it is a usable bit-width set.

    A set must be non-empty, hold integers in 2..16 without duplicates, and
    be sorted from highest to lowest: training walks it in that order and the
    first entry is the stored precision h. 1 bit is refused because a signed
    symmetric 1-bit grid holds only {-1, 0}.
    """
    if isinstance(bits, (str, bytes)) or not hasattr(bits, '__iter__'):
        raise ValueError(f'{key} must be a list of integers, got {bits!r}')
    bits = tuple(bits)
    if not bits:
        raise ValueError(f'{key} must not be empty, got {list(bits)}')
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ValueError(
                f'{key} must hold integers, got {b!r} in {list(bits)}')
        if not MIN_BIT <= b <= MAX_BIT:
            raise ValueError(
                f'{key} entries must lie in {MIN_BIT}..{MAX_BIT}, got {b} '
                f'in {list(bits)}')
    if len(set(bits)) != len(bits):
        raise ValueError(f'{key} has duplicates: {list(bits)}')
    if list(bits) != sorted(bits, reverse=True):
        raise ValueError(
            f'{key} must be sorted from highest to lowest, got {list(bits)} '
            f'(did you mean {sorted(bits, reverse=True)}?)')
    return bits


def check_bit(bit, bits: Iterable[int], key: str = 'bit') -> int:
    """Return ``bit`` as an int after checking it is one of ``bits``.

    The one check of a chosen bit (a model's, a layer's, a SubNet's): 8.0
    or True equal 8 or 1 but would name no per-bit module (``bns['8.0']``).
    """
    bits = list(bits)
    if isinstance(bit, bool) or not isinstance(bit, numbers.Integral):
        raise ValueError(f'{key} must be an integer, one of {bits}; got '
                         f'{bit!r} ({type(bit).__name__})')
    if bit not in bits:
        raise ValueError(f'{key}={bit!r} is not one of the bits {bits}')
    return int(bit)


def check_bit_selection(bits, available: Iterable[int],
                        key: str = 'bits') -> Tuple[int, ...]:
    """Some of a model's bits, each once (an evaluation's or an export's
    choice): ``bits`` as ints, or an error naming ``key``."""
    if isinstance(bits, (str, bytes)) or not hasattr(bits, '__iter__'):
        raise ValueError(f'{key} must be a list of the model\'s bits '
                         f'{list(available)}, got {bits!r}')
    bits = tuple(check_bit(b, available, key) for b in bits)
    if len(set(bits)) != len(bits):
        raise ValueError(f'{key}: {list(bits)} holds a bit twice')
    return bits


def signed_range(bit: int) -> Tuple[int, int]:
    """Integer limits of a signed symmetric ``bit``-bit grid."""
    return -(2**(bit - 1)), 2**(bit - 1) - 1


def unsigned_range(bit: int) -> Tuple[int, int]:
    """Integer limits of an unsigned ``bit``-bit grid."""
    return 0, 2**bit - 1


def bit_name(bit: int) -> str:
    """Name of the uniform setting ``bit``: ``w4a4``."""
    return f'w{bit}a{bit}'


def tag(name: str) -> str:
    """Suffix of a setting's log and metric keys: ``loss@w4a4``, or
    ``accuracy/top1@<SubNet name>``."""
    return '@' + name


def bit_tag(bit: int) -> str:
    """``tag`` of the uniform setting ``bit``: ``@w4a4``."""
    return tag(bit_name(bit))


def split_tag(key: str) -> Tuple[str, str]:
    """``(metric, setting name)`` of a tagged key: the inverse of ``tag``."""
    metric, _, name = key.rpartition('@')
    return metric, name
