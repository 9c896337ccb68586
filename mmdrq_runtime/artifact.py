"""An export folder: one graph holding the stored integers, every setting
derived from it.

``model.onnx`` is the whole QDQ graph at the stored bit h (a complete ONNX
model of that setting). Every other bit or SubNet runs the same graph with
other values: its weights' integers are derived from the stored ones by the
second rounding (shift, round, clip; listed in ``meta.json``), and its few
float values (scales, biases, BN statistics) are in ``<setting>.npz``. A
setting's model is rebuilt when its session is made, equal value for value
to the file the exporter made for it (the exporter checks that).

``meta.json`` lists every file with its SHA-256; names are plain file names
inside the folder. Reading checks all of it before any setting runs.
"""
import functools
import hashlib
import json
import os.path as osp
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Union

import numpy as np

META = 'meta.json'
GRAPH = 'model.onnx'
FORMAT = 'mmdrq-onnx'
FORMAT_VERSION = 2
# folders whose settings shift some weights by other than h - l (per-bit
# step shifts, ``weight_shifts``): a reader of version 2 would derive them
# wrongly, so it must refuse them
SHIFTS_FORMAT_VERSION = 3
FORMAT_VERSIONS = (FORMAT_VERSION, SHIFTS_FORMAT_VERSION)
CONTAINER_BIT = 8  # int8 / uint8 containers
_PLAIN_NAME = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.@+-]*\Z')


def check_file_name(name) -> str:
    """``name`` if it is a plain file name inside the folder (no path, no
    ``..``); a ValueError naming it otherwise."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name) or \
            name in ('.', '..') or '..' in name:
        raise ValueError(f'{name!r} is not a plain file name inside the '
                         'export folder (letters, digits, _ . @ + -)')
    return name


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def read_meta(folder: str) -> dict:
    """The folder's ``meta.json``, checked to be an mmdrq ONNX export of
    this format whose every file name is a plain name."""
    path = osp.join(folder, META)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{folder!r} has no {META}: not an mmdrq '
                                'ONNX export folder (tools/export_onnx.py)')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{path!r} is not valid JSON: {e}') from e
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise ValueError(f'{path!r} is not an mmdrq ONNX export '
                         f'(format != {FORMAT!r})')
    if meta.get('format_version') not in FORMAT_VERSIONS:
        raise ValueError(f'{path!r} has format_version='
                         f'{meta.get("format_version")!r}, this mmdrq reads '
                         f'{list(FORMAT_VERSIONS)}: export it again')
    files = meta.get('files')
    if not isinstance(files, dict) or not files:
        raise ValueError(f'{path!r} lists no files')
    for name in files:
        check_file_name(name)
    for entry in meta.get('settings', []):
        for key in ('file', 'values'):
            if entry.get(key) is not None and entry[key] not in files:
                raise ValueError(f'{path!r}: setting {entry.get("name")!r} '
                                 f'names {entry[key]!r}, which is not among '
                                 'its checked files')
    return meta


def verify(folder: str, meta: dict):
    """Every listed file present with its SHA-256; an error naming the
    first that is not."""
    for name, digest in meta['files'].items():
        path = osp.join(folder, name)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{path!r} is missing from the export '
                                    'folder (listed in its meta.json)')
        if sha256_file(path) != digest:
            raise ValueError(f'{path!r} does not match the SHA-256 in '
                             f'{META}: damaged, truncated or replaced; '
                             'export the folder again')


def second_rounding(container: np.ndarray, stored_bit: int, bit: int,
                    rounding: str, mode: str,
                    shift: Optional[int] = None) -> np.ndarray:
    """A lower bit's int8 container integers from the stored bit's (see
    ``shift_round_clip``), by table: one lookup per pair of weights."""
    flat = np.ascontiguousarray(container, np.int8).reshape(-1)
    single, pairs = _tables(stored_bit, bit, rounding, mode, shift)
    out = np.empty_like(flat)
    even = flat.size - flat.size % 2
    out[:even].view(np.uint16)[:] = pairs[flat[:even].view(np.uint16)]
    out[even:] = single[flat[even:].view(np.uint8)]
    return out.reshape(np.shape(container))


@functools.lru_cache(maxsize=None)
def _tables(stored_bit: int, bit: int, rounding: str, mode: str,
            shift: Optional[int]):
    """``shift_round_clip`` of every int8 value (indexed by its byte), and
    of every pair of them (indexed by the two bytes as one uint16)."""
    every = np.arange(256, dtype=np.uint8).view(np.int8)
    single = shift_round_clip(every, stored_bit, bit, rounding, mode, shift)
    both = np.arange(65536, dtype=np.uint16).view(np.uint8)
    pairs = single[both].view(np.uint16)
    return single, pairs


def shift_round_clip(container: np.ndarray, stored_bit: int, bit: int,
                     rounding: str, mode: str,
                     shift: Optional[int] = None) -> np.ndarray:
    """The stored integers ``q_h`` (the container shifted right by
    ``8 - h``), shifted right by ``d = shift`` bits (default ``h - bit``;
    more with a per-bit step shift ``k``: ``h - bit + k``) with the
    rounding of training (``half_even``, ``half_up``, or the bare shift for
    ``mode='floor'``), clipped to the signed ``bit``-bit range and aligned
    to the container's top bits again. int8 arithmetic: every
    intermediate fits."""
    if rounding not in ('half_even', 'half_up'):
        raise ValueError(f'unknown rounding {rounding!r}')
    q = np.asarray(container, np.int8) >> (CONTAINER_BIT - stored_bit)
    d = stored_bit - bit if shift is None else shift
    if d < 0 or d >= CONTAINER_BIT:
        raise ValueError(f'shift {d} of a {stored_bit}-bit weight to {bit} '
                         'bits is outside 0..7')
    if d > 0:
        low = q >> d  # floor(q / 2**d): numpy shifts signed values down
        if mode != 'floor':
            rest = q & ((1 << d) - 1)  # q - low * 2**d, in 0 .. 2**d - 1
            half = 1 << (d - 1)
            tie = rest == half
            if rounding == 'half_even':  # a tie goes to the even neighbour
                tie &= (low & 1) == 1
            low += (rest > half) | tie
        q = low
    q = np.clip(q, -(1 << (bit - 1)), (1 << (bit - 1)) - 1)
    return q << (CONTAINER_BIT - bit)


class ExportFolder:
    """A checked export folder (``read_meta`` and every file's SHA-256 at
    opening); ``model(key)`` rebuilds a setting's ONNX model.

    Keys are bits (ints) for uniform settings and names for SubNets.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = read_meta(folder)
        verify(folder, self.meta)
        self.entries = {}
        for entry in self.meta['settings']:
            key = entry['bit'] if entry.get('bit') is not None else \
                entry['name']
            self.entries[key] = entry
        self._graph = None

    @property
    def available(self) -> list:
        """Bits (ints) and SubNet names this folder holds."""
        return list(self.entries)

    def entry(self, key: Union[int, str]) -> dict:
        if key not in self.entries:
            raise ValueError(f'{key!r} is not exported in {self.folder!r} '
                             f'(available: {self.available})')
        return self.entries[key]

    def graph(self):
        """The stored graph, parsed once."""
        import onnx
        if self._graph is None:
            self._graph = onnx.load(osp.join(self.folder, GRAPH))
        return self._graph

    def model(self, key: Union[int, str]):
        """The ONNX model of setting ``key`` (a fresh ModelProto)."""
        import onnx
        entry = self.entry(key)
        if entry.get('file') is not None:  # a plain per-setting file
            return onnx.load(osp.join(self.folder, entry['file']))
        return self.fill(copy_model(self.graph()), key)

    def values(self, key: Union[int, str]) -> Dict[str, np.ndarray]:
        """Setting ``key``'s float values (and Clip bounds) by initializer
        name, where they differ from the stored graph's."""
        name = self.entry(key).get('values')
        if name is None:
            return {}
        path = osp.join(self.folder, name)
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except ValueError as e:  # an object array: numpy refuses to unpickle
            raise ValueError(f'{path!r}: {e}; an export folder holds numeric '
                             'arrays only (refused)') from None

    def fill(self, proto, key: Union[int, str], values=None,
             absent: frozenset = frozenset()):
        """Put setting ``key`` into ``proto`` (in place, and return it): a
        copy of the stored graph, or of one rewritten without changing the
        initializers' names and values (``absent``: names it dropped).
        Weights take their integers by ``second_rounding`` of the stored
        ones, on a few threads; float values come from ``values`` (default
        ``self.values(key)``)."""
        from onnx import numpy_helper
        entry = self.entry(key)
        values = dict(self.values(key) if values is None else values)
        integers, weight_bits = self.meta['integers'], \
            entry.get('weight_bits', {})
        shifts = entry.get('weight_shifts', {})
        derived = []
        for init in proto.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values.pop(init.name),
                                                      init.name))
            elif init.name in weight_bits:
                derived.append(init)

        def derive(init):
            spec = integers[init.name]
            stored = np.frombuffer(init.raw_data, np.int8) \
                if init.raw_data else numpy_helper.to_array(init)
            return second_rounding(stored, spec['stored_bit'],
                                   weight_bits[init.name], spec['rounding'],
                                   spec['mode'],
                                   shifts.get(init.name)).tobytes()

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            for init, data in zip(derived, pool.map(derive, derived)):
                init.raw_data = data  # numpy's lookups release the GIL
        if set(values) - absent:
            raise ValueError(f'{self.folder!r}: {entry.get("values")!r} '
                             'holds values the graph lacks: '
                             f'{sorted(set(values) - absent)[:3]}')
        return proto


def copy_model(proto):
    import onnx
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy
