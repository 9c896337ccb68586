"""An export folder: one ONNX file per bit (or SubNet) plus ``meta.json``.

Every file is written atomically and ``meta.json`` last, so a reader sees
a complete previous export or a complete new one. A folder is only reused
if it holds nothing but an earlier export's files.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional

import onnx

from mmdrq.quantization.bitwidths import bit_name
from mmdrq.utils.atomic import atomic_write
from mmdrq.version import __version__

META = 'meta.json'
FORMAT = 'mmdrq-onnx'
FORMAT_VERSION = 1


def export_name(bit: Optional[int] = None, subnet: Optional[str] = None):
    """``w4a4`` for a bit, ``subnet_<name>`` for a SubNet."""
    return bit_name(bit) if subnet is None else f'subnet_{subnet}'


def read_meta(folder: str) -> dict:
    """The folder's ``meta.json``, checked to be an mmdrq ONNX export."""
    path = osp.join(folder, META)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{folder!r} has no {META}: not an mmdrq '
                                'ONNX export folder (tools/export_onnx.py)')
    with open(path) as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise ValueError(f'{path!r} is not an mmdrq ONNX export '
                         f'(format != {FORMAT!r})')
    if meta.get('format_version') != FORMAT_VERSION:
        raise ValueError(f'{path!r} has format_version='
                         f'{meta.get("format_version")}, this mmdrq reads '
                         f'{FORMAT_VERSION}')
    return meta


def check_out_dir(folder: str):
    """Refuse, before any work, a folder holding anything but an earlier
    export's files (and a path that is a file)."""
    if not osp.exists(folder):
        return
    if not osp.isdir(folder):
        raise NotADirectoryError(f'--out-dir {folder!r} is a file')
    entries = set(os.listdir(folder))
    if not entries:
        return
    try:
        meta = read_meta(folder)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise FileExistsError(
            f'--out-dir {folder!r} holds other files ({sorted(entries)[:5]}) '
            f'and is not an mmdrq ONNX export ({e}); choose an empty or new '
            'folder') from e
    known = {META} | {entry['file'] for entry in meta['exports']}
    others = sorted(entries - known)
    if others:
        raise FileExistsError(f'--out-dir {folder!r} holds files that are not '
                              f'part of its export: {others[:5]}; choose an '
                              'empty or new folder')


def write_folder(folder: str, models: Dict[str, onnx.ModelProto],
                 exports: List[dict], info: dict):
    """Write ``models`` (file name -> model), then ``meta.json`` listing
    ``exports`` (dicts with ``name``, ``file``, ``bit`` or ``layer_bits``)
    and ``info``; then remove files of an earlier export that the new one
    does not have."""
    check_out_dir(folder)
    previous = set()
    if osp.isdir(folder) and osp.exists(osp.join(folder, META)):
        previous = {e['file'] for e in read_meta(folder)['exports']}
    os.makedirs(folder, exist_ok=True)
    for file, model in models.items():
        data = model.SerializeToString()
        atomic_write(osp.join(folder, file), lambda f: f.write(data))
    meta = dict(info, format=FORMAT, format_version=FORMAT_VERSION,
                mmdrq_version=__version__, exports=exports)
    text = json.dumps(meta, indent=1).encode()
    atomic_write(osp.join(folder, META), lambda f: f.write(text))
    for file in previous - set(models):
        os.remove(osp.join(folder, file))
    return meta
