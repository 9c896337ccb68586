"""Writing an export folder (``mmdrq_runtime.artifact`` reads it).

Packs the settings' ONNX models into one stored graph plus each setting's
differing float values, and checks that the reader rebuilds every setting
value for value before anything is written. The folder is written into a
staging folder beside it and swapped in, so a reader sees a complete old or
a complete new export after a kill or a full disk.
"""
import ctypes
import glob
import io
import json
import os
import os.path as osp
import shutil
import tempfile
from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from mmdrq.utils.atomic import current_umask, fsync_folder
from mmdrq.version import __version__
from mmdrq_runtime.artifact import (FORMAT, FORMAT_VERSION, GRAPH, META,
                                    SHIFTS_FORMAT_VERSION,
                                    ExportFolder, check_file_name, copy_model,
                                    read_meta,
                                    sha256_bytes)
from mmdrq_runtime.session import drop_identity_clips

LAYOUTS = ('single', 'per_bit')


def check_out_dir(folder: str, identity: Optional[str] = None,
                  overwrite: bool = False):
    """Refuse, before any work, a path that is a file, a folder holding
    anything but an mmdrq export, and (unless ``overwrite``) the export of
    another model (``identity`` differs) or of an older format."""
    _recover(folder)
    if not osp.exists(folder):
        return
    if not osp.isdir(folder):
        raise NotADirectoryError(f'--out-dir {folder!r} is a file')
    entries = sorted(os.listdir(folder))
    if not entries:
        return
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError) as e:
        if overwrite and osp.isfile(osp.join(folder, META)):
            return _only_export_files(folder, None)
        raise FileExistsError(
            f'--out-dir {folder!r} holds other files ({entries[:5]}) and is '
            f'not an mmdrq ONNX export of this version ({e}); choose an '
            'empty or new folder') from e
    _only_export_files(folder, meta)
    if identity is not None and meta.get('model_identity') != identity \
            and not overwrite:
        raise FileExistsError(
            f'--out-dir {folder!r} holds the export of another model '
            f'({meta.get("model")}, bits {meta.get("model_bits")}, config '
            f'{meta.get("config")!r}); choose another folder, or pass '
            '--overwrite to replace it')


def _only_export_files(folder: str, meta: Optional[dict]):
    known = {META} | set(meta['files'] if meta else ())
    others = sorted(set(os.listdir(folder)) - known)
    if meta is None:  # an older export: its .onnx files and meta.json
        others = [o for o in others if not o.endswith('.onnx')]
    if others:
        raise FileExistsError(f'--out-dir {folder!r} holds files that are not '
                              f'part of its export: {others[:5]}; choose an '
                              'empty or new folder')


def pack(settings: List[dict], models: Dict[str, onnx.ModelProto],
         integers: Dict[str, Dict[str, dict]], base: onnx.ModelProto,
         layout: str = 'single') -> (Dict[str, bytes], List[dict], dict):
    """(file name -> bytes, setting entries, weight integer specs) of the
    folder. ``settings`` are dicts with ``name``, ``bit``, ``layer_bits``;
    ``models[name]`` and ``integers[name]`` what ``export_setting`` gave;
    ``base`` the stored bit's model (None when the stored bit does not fit
    the container: every setting keeps its own integers then); ``layout``
    is one of ``LAYOUTS``, checked by the caller before any export."""
    files, entries, specs = {}, [], {}
    if layout == 'per_bit':
        for setting in settings:
            proto = drop_identity_clips(copy_model(models[setting['name']]))
            file = check_file_name(setting['name'] + '.onnx')
            files[file] = proto.SerializeToString()
            entries.append(dict(setting, file=file))
        return files, entries, specs
    derive = base is not None  # lower bits from the stored integers
    base = base if derive else models[settings[0]['name']]
    base_values = {i.name: i for i in base.graph.initializer}
    files[GRAPH] = base.SerializeToString()
    structure = _structure(base)
    for setting in settings:
        name = setting['name']
        proto = models[name]
        if _structure(proto) != structure:
            raise RuntimeError(f'setting {name!r}: its graph differs from the '
                               'stored one (an exporter bug)')
        values, weight_bits, shifts = {}, {}, {}
        for init in proto.graph.initializer:
            spec = integers[name].get(init.name) if derive else None
            if spec is not None and spec['bit'] != spec['stored_bit']:
                weight_bits[init.name] = spec['bit']
                if spec['shift'] != spec['stored_bit'] - spec['bit']:
                    shifts[init.name] = spec['shift']  # a step shift
                specs[init.name] = {k: spec[k] for k in
                                    ('stored_bit', 'rounding', 'mode')}
            elif init.SerializeToString() != \
                    base_values[init.name].SerializeToString():
                values[init.name] = numpy_helper.to_array(init)
        entry = dict(setting, weight_bits=weight_bits, values=None)
        if shifts:
            entry['weight_shifts'] = shifts
        if values:
            entry['values'] = check_file_name(name + '.npz')
            buffer = io.BytesIO()
            np.savez(buffer, **values)
            files[entry['values']] = buffer.getvalue()
        entries.append(entry)
    return files, entries, specs


def _structure(proto: onnx.ModelProto) -> bytes:
    """The graph without its initializers' values."""
    skeleton = copy_model(proto)
    for init in skeleton.graph.initializer:
        init.ClearField('raw_data')
        for field in ('float_data', 'int32_data', 'int64_data',
                      'double_data', 'uint64_data'):
            init.ClearField(field)
    return skeleton.SerializeToString()


def write_folder(folder: str, files: Dict[str, bytes], meta: dict,
                 models: Dict[str, onnx.ModelProto], identity: str,
                 overwrite: bool = False) -> dict:
    """Write ``files`` and ``meta.json`` (with every file's SHA-256) into a
    staging folder beside ``folder``, check that every setting rebuilds to
    its model in ``models`` (name -> model) value for value, then swap it
    in; the old export is removed only after. Returns the meta."""
    check_out_dir(folder, identity, overwrite)
    folder = osp.abspath(folder)
    parent, base = osp.split(folder)
    os.makedirs(parent, exist_ok=True)
    version = SHIFTS_FORMAT_VERSION if any(
        'weight_shifts' in entry for entry in meta['settings']) \
        else FORMAT_VERSION
    meta = dict(meta, format=FORMAT, format_version=version,
                mmdrq_version=__version__, model_identity=identity,
                files={name: sha256_bytes(data)
                       for name, data in files.items()})
    staging = tempfile.mkdtemp(prefix=f'.{base}.staging-', dir=parent)
    try:
        os.chmod(staging, 0o777 & ~current_umask())
        for name, data in list(files.items()) + [
                (META, json.dumps(meta, indent=1).encode())]:
            with open(osp.join(staging, name), 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_folder(staging)
        _check_rebuilt(staging, meta, models)
        _swap(staging, folder)
    finally:
        if osp.exists(staging):
            shutil.rmtree(staging)
    return meta


def _check_rebuilt(staging: str, meta: dict, models):
    export = ExportFolder(staging)
    for entry in meta['settings']:
        key = entry['bit'] if entry['bit'] is not None else entry['name']
        got = drop_identity_clips(export.model(key))
        want = drop_identity_clips(copy_model(models[entry['name']]))
        if got.SerializeToString() != want.SerializeToString():
            raise RuntimeError(f'setting {entry["name"]!r} does not rebuild '
                               'to its exported model (an exporter bug)')


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b),
                 rename_exchange) == 0:
        return True
    return False


def _swap(staging: str, folder: str):
    """Put ``staging`` at ``folder``; the old folder is deleted last."""
    parent, base = osp.split(folder)
    if not osp.exists(folder):
        os.rename(staging, folder)
    elif _exchange(staging, folder):
        shutil.rmtree(staging)  # now the old export
    else:  # two renames; _recover puts the old one back after a kill
        old = tempfile.mkdtemp(prefix=f'.{base}.old-', dir=parent)
        os.rmdir(old)
        os.rename(folder, old)
        os.rename(staging, folder)
        shutil.rmtree(old)
    fsync_folder(parent)


def _recover(folder: str):
    """Leftovers of a killed export beside ``folder``: a staging folder is
    removed; an old export is put back if the new one never arrived."""
    folder = osp.abspath(folder)
    parent, base = osp.split(folder)
    for path in glob.glob(osp.join(glob.escape(parent),
                                   f'.{glob.escape(base)}.staging-*')):
        shutil.rmtree(path, ignore_errors=True)
    for path in glob.glob(osp.join(glob.escape(parent),
                                   f'.{glob.escape(base)}.old-*')):
        if not osp.exists(folder):
            os.rename(path, folder)
        else:
            shutil.rmtree(path, ignore_errors=True)
