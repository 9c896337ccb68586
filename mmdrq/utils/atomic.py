"""Write files so that a reader sees the old file or the new one, never half."""
import os
import tempfile

import torch


def atomic_torch_save(obj, path: str):
    """``torch.save`` to a temporary file in the target folder, fsync, then
    rename over ``path``; the temporary file is removed on any failure."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
