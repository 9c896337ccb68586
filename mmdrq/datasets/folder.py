"""A dataset folder that the writers own: written into a temporary sibling
and put in place only once complete, stamped with the settings that made it
(``dataset.json``). Only such a folder is ever replaced, never a user's."""
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Callable


def check_distinct_roots(**roots: str):
    """Two outputs may not be one folder, or one inside the other (the
    second would replace the first)."""
    items = [(flag, osp.abspath(root)) for flag, root in roots.items()]
    for i, (flag_a, a) in enumerate(items):
        for flag_b, b in items[i + 1:]:
            if a == b or a.startswith(b + os.sep) or \
                    b.startswith(a + os.sep):
                raise ValueError(f'{flag_a} {roots[flag_a]!r} and {flag_b} '
                                 f'{roots[flag_b]!r} must be separate '
                                 'folders')


def check_replaceable(root: str, kind: str):
    """Refuse, before any work, a ``root`` that is a file, or a folder that
    holds anything but a dataset of ``kind`` these writers made (its
    ``dataset.json``): only that is ever replaced, never a user's folder
    or a dataset of the other kind."""
    if not osp.lexists(root):
        return
    if not osp.isdir(root) or osp.islink(root):
        raise FileExistsError(f'dataset root {root!r} is not a folder')
    if not os.listdir(root):
        return
    stamp = osp.join(root, 'dataset.json')
    try:
        with open(stamp) as f:
            found = json.load(f)['settings']['kind']
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found != kind:
        what = f'a {found} dataset' if found else \
            f'other files ({sorted(os.listdir(root))[:3]})'
        raise FileExistsError(
            f'dataset root {root!r} holds {what}, not a {kind} dataset '
            'written here; choose an empty or new folder (nothing was '
            'changed)')


def write_dataset_folder(root: str, settings: dict, build: Callable[[str], dict]):
    """Run ``build(folder)`` in a temporary sibling of ``root`` and put the
    result in ``root``'s place only once complete (the old folder is removed
    after the new one is there). A ``root`` whose ``dataset.json`` holds
    ``settings`` is kept. Returns the counts ``build`` reports."""
    root = osp.abspath(root)
    stamp = osp.join(root, 'dataset.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            last = json.load(f)
        if last.get('settings') == settings:
            return last['counts']
    check_replaceable(root, settings['kind'])
    parent = osp.dirname(root)
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix=f'.{osp.basename(root)}.', dir=parent)
    old = None
    try:
        counts = build(new)
        with open(osp.join(new, 'dataset.json'), 'w') as f:
            json.dump(dict(settings=settings, counts=counts), f, indent=1)
        os.chmod(new, 0o755)
        if osp.lexists(root):
            old = new + '.old'
            os.rename(root, old)
        os.rename(new, root)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if old is not None and not osp.lexists(root):
            os.rename(old, root)
        raise
    if old is not None:
        shutil.rmtree(old)
    return counts


def check_sizes(**sizes: int):
    """Each of ``sizes`` a positive int, or an error naming it."""
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f'{key} must be a positive int, got {value!r}')
