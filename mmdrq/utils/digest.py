"""SHA-256 of a checkpoint's tensors, one per tensor.

torch does not check the CRCs of its zip files, so bytes flipped inside a
tensor load as other weights and a metric is computed on them: the files
mmdrq writes carry these digests, and loading them checks them and names
the first tensor that differs.
"""
import hashlib
from typing import Dict, Iterable, Optional, Tuple

import torch


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256(f'{tensor.dtype}:{list(tensor.shape)};'.encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1)
                  .view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_digests(tensors: Iterable[Tuple[str, object]]) -> Dict[str, str]:
    """Name -> ``tensor_sha256`` of the tensors among ``(name, value)``."""
    return {name: tensor_sha256(value) for name, value in tensors
            if isinstance(value, torch.Tensor)}


def first_changed(digests: Dict[str, str],
                  tensors: Dict[str, object]) -> Optional[str]:
    """The first name (in ``digests``' order) whose tensor is missing or
    does not have its recorded digest; None if all match."""
    for name, want in digests.items():
        value = tensors.get(name)
        if not isinstance(value, torch.Tensor) or \
                tensor_sha256(value) != want:
            return name
    return None
