from .atomic import atomic_torch_save, atomic_write, atomic_write_json
from .safe_checkpoint import (UnsafeCheckpointError,
                              allow_mmengine_checkpoints, load_weights_only)

__all__ = [
    'UnsafeCheckpointError', 'allow_mmengine_checkpoints',
    'atomic_torch_save', 'atomic_write', 'atomic_write_json',
    'load_weights_only'
]
