from .int_checkpoint import load_int, save_int

__all__ = ['load_int', 'save_int']
