from .atomic import atomic_torch_save, atomic_write
from .safe_checkpoint import (UnsafeCheckpointError,
                              allow_mmengine_checkpoints, load_weights_only)

__all__ = [
    'UnsafeCheckpointError', 'allow_mmengine_checkpoints',
    'atomic_torch_save', 'atomic_write', 'load_weights_only'
]
