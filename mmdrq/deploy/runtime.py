"""ONNX Runtime sessions over an export folder, switchable by bit."""
import os.path as osp
from typing import Dict, Optional, Union

import numpy as np

from .folder import read_meta


KERNELS = ('exact', 'integer')


def make_session(model, threads: Optional[int] = None,
                 kernels: str = 'exact', optimized_path: str = None):
    """A CPU ONNX Runtime session of ``model`` (a path or serialized bytes).

    ``kernels='exact'`` keeps ONNX Runtime from fusing the QDQ groups
    (``session.disable_quant_qdq``): convolutions run in float on the
    dequantized integers, as PyTorch's fake quantization computes, so
    outputs equal PyTorch's to float rounding. ``'integer'`` lets it fuse
    DequantizeLinear -> Conv -> QuantizeLinear into integer kernels
    (QLinearConv): faster, but its int32 bias (the folded BN shift rounded
    to input scale times weight scale) and its requantization differ from
    the float computation, which flips some low-bit activations.
    """
    import onnxruntime as ort
    if kernels not in KERNELS:
        raise ValueError(f'kernels must be one of {list(KERNELS)}, got '
                         f'{kernels!r}')
    options = ort.SessionOptions()
    options.graph_optimization_level = \
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if kernels == 'exact':
        options.add_session_config_entry('session.disable_quant_qdq', '1')
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options,
                                providers=['CPUExecutionProvider'])


class SwitchableSession:
    """One ONNX Runtime session per export of a folder, made at the first
    use of its bit (or SubNet) and kept; ``set_bits`` switches.

    Args:
        folder: an export folder (tools/export_onnx.py).
        threads, kernels: see ``make_session``.
    """

    def __init__(self, folder: str, threads: Optional[int] = None,
                 kernels: str = 'exact'):
        self.folder = folder
        self.meta = read_meta(folder)
        self.files = {}
        for entry in self.meta['exports']:
            key = entry['bit'] if entry['bit'] is not None else entry['name']
            self.files[key] = osp.join(folder, entry['file'])
        self.threads, self.kernels = threads, kernels
        self.sessions = {}
        self.current = next(iter(self.files))

    @property
    def available(self) -> list:
        """Bits (ints) and SubNet names this folder holds."""
        return list(self.files)

    def set_bits(self, bits: Union[int, str]):
        """Run at ``bits``: a bit of the folder or a SubNet's name."""
        if bits not in self.files:
            raise ValueError(f'{bits!r} is not exported in {self.folder!r} '
                             f'(available: {self.available})')
        self.current = bits
        return self

    def session(self):
        """The current bit's session (made now if it was not yet)."""
        if self.current not in self.sessions:
            self.sessions[self.current] = make_session(
                self.files[self.current], self.threads, self.kernels)
        return self.sessions[self.current]

    def run(self, inputs: np.ndarray) -> list:
        """Outputs (flat list of arrays) at the current bits."""
        return self.session().run(None, {self.meta['input_name']: inputs})
