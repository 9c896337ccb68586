"""Write files so that a reader sees the old file or the new one, never half."""
import json
import os
import tempfile
from typing import BinaryIO, Callable

import torch


def atomic_write(path: str, write: Callable[[BinaryIO], object]):
    """Call ``write(f)`` on a temporary file in the target folder, fsync, give
    it the usual permissions (not mkstemp's private 0600), then rename it
    over ``path`` and fsync the folder, so the rename itself survives a
    crash; on any failure the temporary file is removed and ``path`` keeps
    its old content."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def current_umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def fsync_folder(folder: str):
    """Flush the folder entry of a rename (POSIX; a no-op where folders
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str):
    """``torch.save`` through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(path: str, content):
    """``content`` as indented JSON through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(
        json.dumps(content, indent=1).encode()))
