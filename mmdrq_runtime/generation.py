"""Text from a language model's logits, one token at a time, the same for
every backend: the caller gives ``logits(ids) -> (1, T, vocab)`` (a PyTorch
model at a bit, or an ONNX Runtime session of an export folder)."""
from typing import Callable, Optional, Sequence

import numpy as np


def generate(logits: Callable[[np.ndarray], np.ndarray],
             prompt: Sequence[int], count: int, context: int,
             temperature: float = 0.0,
             seed: Optional[int] = None) -> list:
    """``count`` token ids after ``prompt``: each from the logits of the
    last ``context`` ids (the model's longest sequence), the most likely
    one (``temperature=0``, greedy) or drawn from ``softmax(logits /
    temperature)`` with ``seed``. The whole window is run again for every
    token (no key-value cache)."""
    if not len(prompt):
        raise ValueError('generation needs a prompt of at least one token')
    if count < 0 or context < 1:
        raise ValueError(f'count must be >= 0 and context >= 1, got '
                         f'count={count}, context={context}')
    if temperature < 0:
        raise ValueError(f'temperature must be >= 0, got {temperature}')
    rng = np.random.default_rng(seed)
    ids = [int(i) for i in prompt]
    for _ in range(count):
        window = np.asarray([ids[-context:]], np.int64)
        last = np.asarray(logits(window), np.float64)[0, -1]
        if temperature == 0:
            ids.append(int(np.argmax(last)))
        else:
            p = np.exp((last - last.max()) / temperature)
            ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return ids[len(prompt):]
