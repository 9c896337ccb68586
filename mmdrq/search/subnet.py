"""SubNet files: one bit per quantized layer, as JSON with ``layer_bits``.

Written by tools/search_subnet.py, read by the per-bit test loop
(``subnets=[...]``) and tools/export_int.py; errors name the file.
"""
import os.path as osp
from typing import Dict, Optional

from torch import nn

from mmdrq.quantization.bit_control import check_layer_bits
from mmdrq.utils import atomic_write_json
from mmdrq.utils.json_files import read_json


def subnet_name(path: str) -> str:
    """A SubNet's setting name (in ``accuracy/top1@<name>``): its file's."""
    return osp.splitext(osp.basename(path))[0]


def check_subnet(content, source: str,
                 model: Optional[nn.Module] = None) -> Dict[str, int]:
    """The ``layer_bits`` of a SubNet's ``content`` after checking that every
    bit is an integer and, with ``model``, that every name is one of its
    quantized layers and every bit one of its bits; errors name ``source``."""
    if not isinstance(content, dict) or \
            not isinstance(content.get('layer_bits'), dict):
        raise ValueError(f'{source} has no "layer_bits" mapping')
    layer_bits = content['layer_bits']
    for name, bit in layer_bits.items():
        if isinstance(bit, bool) or not isinstance(bit, int):
            raise ValueError(f'{source}: layer_bits[{name!r}] '
                             f'must be an integer bit, got {bit!r}')
    if model is not None:
        layer_bits = check_layer_bits(model, layer_bits, source)
    return layer_bits


def save_subnet(path: str, layer_bits: Dict[str, int],
                model: Optional[nn.Module] = None, **info):
    """Write a SubNet file atomically: ``layer_bits`` (checked against
    ``model`` when given) plus ``info`` (budget, costs, objective...)."""
    content = dict(info, layer_bits=dict(layer_bits))
    check_subnet(content, f'SubNet {subnet_name(path)!r}', model)
    atomic_write_json(path, content)


def load_subnet(path: str, model: Optional[nn.Module] = None
                ) -> Dict[str, int]:
    """Per-layer bits of a SubNet file; with ``model``, checked against its
    quantized layers and bits."""
    source = f'SubNet file {path!r}'
    return check_subnet(read_json(path, source), source, model)
