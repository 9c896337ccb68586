"""Let torch's safe ``weights_only`` loading read MMEngine's checkpoints.

MMEngine 0.10.7 calls ``torch.load`` without ``weights_only``, which torch
>= 2.6 turns on by default, and its checkpoints hold a few non-tensor
objects: the message hub's ``HistoryBuffer`` (numpy arrays and scalars
inside) and, inside each buffer, its table of statistics *functions*, which
pickle as ``getattr(HistoryBuffer, 'min')`` and would need ``getattr``
allow-listed. Rather than allow ``getattr`` (a general gadget), buffers are
pickled without that table (MMEngine keeps it on the class), only the data
classes are allow-listed, and the name ``builtins.getattr`` in a checkpoint
(one that MMEngine wrote without mmdrq: mmpretrain's, mmdet's, mmseg's own
``tools/train.py``) reads as ``history_buffer_statistic``, which gives
``HistoryBuffer``'s statistics methods and refuses everything else.

torch's default can be turned off from the environment
(``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``), which then runs any pickled code in
a checkpoint: mmdrq passes ``weights_only=True`` explicitly, and makes
MMEngine's loaders of local files and of URLs (torch.hub, which loads with
``weights_only=False``) do the same.
"""
import copyreg
import os.path as osp
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner import CheckpointLoader
from mmengine.runner import checkpoint as mmengine_checkpoint

_installed = False


def _reduce_history_buffer(buffer: HistoryBuffer):
    state = {k: v for k, v in buffer.__dict__.items()
             if k != 'statistics_methods'}
    return HistoryBuffer, (), state


def history_buffer_statistic(owner, name):
    """``getattr(owner, name)`` for MMEngine's ``HistoryBuffer`` and one of
    its statistics methods (what a buffer's pickled table holds); an
    UnpicklingError for anything else."""
    if owner is HistoryBuffer and isinstance(name, str) and \
            name in HistoryBuffer._statistics_methods:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({getattr(owner, "__name__", type(owner).__name__)}, '
        f'{name!r}) in a checkpoint: only HistoryBuffer\'s statistics are '
        'allowed')


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


class UnsafeCheckpointError(ValueError):
    """A file that holds objects ``weights_only`` loading does not allow."""


def load_weights_only(path: str, map_location=None, mmap: bool = False):
    """``torch.load(path, weights_only=True)``, whatever the environment says;
    a file holding other objects (code a pickle would run) is refused with
    their names. ``mmap``: map the tensors' bytes instead of reading them."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap)
    except (EOFError, RuntimeError) as e:  # torch's words for a broken file
        if isinstance(e, RuntimeError) and not any(
                word in str(e) for word in ('PytorchStreamReader', 'zip',
                                            'truncated')):
            raise
        raise ValueError(f'checkpoint {path!r} cannot be read, truncated or '
                         f'corrupt? ({type(e).__name__}: {e})') from e
    except pickle.UnpicklingError:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(
                path)
        except Exception:  # not even a readable checkpoint: torch's error
            unsafe = None
        if not unsafe:
            raise
        raise UnsafeCheckpointError(
            f'{path!r} holds objects that are not allowed in a checkpoint '
            f'({", ".join(unsafe)}): refused, it is read with '
            'weights_only=True (tensors, containers, numbers, strings and '
            "MMEngine's log buffers only)") from None


def load_from_local_weights_only(filename: str, map_location=None):
    """MMEngine's ``load_from_local`` with ``weights_only=True``."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return load_weights_only(filename, map_location)


def load_url_weights_only(url: str, model_dir=None, map_location=None,
                          progress: bool = True):
    """MMEngine's ``load_url`` (torch.hub's download into its cache, which
    then loads with ``weights_only=False``) reading the file with
    ``weights_only=True``: a URL's checkpoint, also from the cache, is
    refused like a local file that holds code."""
    from torch.hub import load_state_dict_from_url
    try:
        return load_state_dict_from_url(url, model_dir=model_dir,
                                        map_location=map_location,
                                        progress=progress, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f'{url!r} holds objects that are not allowed in a checkpoint: '
            'refused, it is read with weights_only=True (tensors, '
            f'containers, numbers and strings only): {error}') from None


def allow_mmengine_checkpoints():
    """Make checkpoints written from now on, and MMEngine's loads of them,
    work with ``weights_only=True``, and make MMEngine load local files
    (``load_from``, ``resume``, ``load_checkpoint``) and URLs with it.
    Idempotent."""
    global _installed
    if _installed:
        return
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    HistoryBuffer()  # its statistics methods, registered on the class
    torch.serialization.add_safe_globals(
        [HistoryBuffer, (history_buffer_statistic, 'builtins.getattr')] +
        _numpy_globals())
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local_weights_only, force=True)
    # http(s)://, and torchvision://, open-mmlab:// ... which resolve to it
    mmengine_checkpoint.load_url = load_url_weights_only
    _installed = True
