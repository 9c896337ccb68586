"""SHA-256 of a checkpoint's tensors.

torch does not check the CRCs of its zip files, so bytes flipped inside a
tensor load as other weights and a metric is computed on them: the files
mmdrq writes carry this digest, and loading them checks it.
"""
import hashlib
from typing import Iterable, Tuple

import torch


def tensors_sha256(tensors: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``(name, tensor)`` pairs (name, dtype, shape, bytes, in
    name order)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors, key=lambda item: item[0]):
        digest.update(f'{key}:{tensor.dtype}:{list(tensor.shape)};'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1)
                      .view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
