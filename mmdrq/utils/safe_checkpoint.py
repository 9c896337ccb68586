"""Let torch's safe ``weights_only`` loading read MMEngine's checkpoints.

MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch
>= 2.6 turns on by default, and its checkpoints hold a few non-tensor
objects: the message hub's ``HistoryBuffer`` (numpy arrays and scalars
inside) and, inside each buffer, its table of statistics *functions*, which
pickle as ``getattr(HistoryBuffer, 'min')`` and would need ``getattr``
allow-listed. Rather than allow ``getattr`` (a general gadget), buffers are
pickled without that table (MMEngine keeps it on the class and rebuilds it in
``__setstate__``), and only the data classes are allow-listed.
"""
import copyreg

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

_installed = False


def _reduce_history_buffer(buffer: HistoryBuffer):
    state = {k: v for k, v in buffer.__dict__.items()
             if k != 'statistics_methods'}
    return HistoryBuffer, (), state


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
    allowed = [core.multiarray._reconstruct, core.multiarray.scalar,
               np.ndarray, np.dtype]
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25
    if dtypes is not None:
        allowed += [getattr(dtypes, name) for name in dir(dtypes)
                    if name.endswith('DType') and name not in (
                        'ObjectDType', 'VoidDType', 'StringDType')]
    return allowed


def allow_mmengine_checkpoints():
    """Make checkpoints written from now on, and MMEngine's loads of them,
    work with ``weights_only=True``. Idempotent."""
    global _installed
    if _installed:
        return
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    torch.serialization.add_safe_globals([HistoryBuffer] + _numpy_globals())
    _installed = True
