from .atomic import atomic_torch_save

__all__ = ['atomic_torch_save']
