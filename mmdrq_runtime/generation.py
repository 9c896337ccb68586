"""Text from a language model, one token at a time, the same for every
backend: ``generate`` reruns the window for each token through
``logits(ids) -> (1, T, vocab)`` (a PyTorch model at a bit, any session);
``generate_cached`` runs an exported decoder step ``step(ids, keys,
values) -> (logits, keys, values)`` on its key-value cache."""
from typing import Callable, Optional, Sequence

import numpy as np

CACHE_INPUTS = ('past_keys', 'past_values')


def empty_cache(cache_shape: Sequence[int], batch: int = 1) -> dict:
    """Feeds of an empty key-value cache, ``(layers, batch, heads, 0, head
    size)`` each: what a whole sequence runs with."""
    layers, heads, size = cache_shape
    empty = np.zeros((layers, batch, heads, 0, size), np.float32)
    return {name: empty for name in CACHE_INPUTS}


def _check(prompt, count: int, context: int, temperature: float):
    if not len(prompt):
        raise ValueError('generation needs a prompt of at least one token')
    if count < 0 or context < 1:
        raise ValueError(f'count must be >= 0 and context >= 1, got '
                         f'count={count}, context={context}')
    if temperature < 0:
        raise ValueError(f'temperature must be >= 0, got {temperature}')


def _pick(last: np.ndarray, temperature: float, rng) -> int:
    """The most likely token (``temperature=0``) or one drawn from
    ``softmax(last / temperature)``."""
    last = np.asarray(last, np.float64)
    if temperature == 0:
        return int(np.argmax(last))
    p = np.exp((last - last.max()) / temperature)
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(logits: Callable[[np.ndarray], np.ndarray],
             prompt: Sequence[int], count: int, context: int,
             temperature: float = 0.0,
             seed: Optional[int] = None) -> list:
    """``count`` token ids after ``prompt``: each from the logits of the
    last ``context`` ids (the model's longest sequence), the most likely
    one (``temperature=0``, greedy) or drawn from ``softmax(logits /
    temperature)`` with ``seed``. The whole window runs for every token."""
    _check(prompt, count, context, temperature)
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in prompt]
    for _ in range(count):
        window = np.asarray([ids[-context:]], np.int64)
        ids.append(_pick(logits(window)[0, -1], temperature, rng))
    return ids[len(prompt):]


def generate_cached(step: Callable, cache_shape: Sequence[int],
                    prompt: Sequence[int], count: int, context: int,
                    temperature: float = 0.0,
                    seed: Optional[int] = None) -> list:
    """``generate`` through a decoder step with a key-value cache: the
    prompt's window runs once, then one token per step on the cache; once
    the cache holds ``context`` tokens, each step runs the last ``context``
    ids again, as ``generate`` does (same windows, same tokens up to float
    rounding)."""
    _check(prompt, count, context, temperature)
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in prompt]
    empty = list(empty_cache(cache_shape).values())
    logits, keys, values = step(np.asarray([ids[-context:]], np.int64),
                                *empty)
    for index in range(count):
        ids.append(_pick(logits[0, -1], temperature, rng))
        if index == count - 1:
            break
        if keys.shape[3] < context:
            logits, keys, values = step(np.asarray([ids[-1:]], np.int64),
                                        keys, values)
        else:
            logits, keys, values = step(
                np.asarray([ids[-context:]], np.int64), *empty)
    return ids[len(prompt):]
