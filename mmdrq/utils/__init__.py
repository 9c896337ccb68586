from .atomic import atomic_torch_save, atomic_write
from .safe_checkpoint import allow_mmengine_checkpoints

__all__ = ['allow_mmengine_checkpoints', 'atomic_torch_save', 'atomic_write']
