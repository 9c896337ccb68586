"""mmdrq: one-shot multi-precision QAT with Double Rounding for OpenMMLab."""
from mmengine.config.utils import MODULE2PACKAGE

from .export import load_int, save_int
from .quantization import (ActQuantizer, DoubleRoundingQuantizer, QConv2d,
                           QLinear, QuantizeConfig, SwitchableBatchNorm,
                           get_bits, quantize_model, set_bits, set_layer_bits,
                           use_bits)
from .utils import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()
# Lets configs inherit ours as ``_base_ = 'mmdrq::classification/...'``.
MODULE2PACKAGE.setdefault('mmdrq', 'mmdrq')

__all__ = [
    '__version__', 'ActQuantizer', 'DoubleRoundingQuantizer', 'QConv2d',
    'QLinear', 'QuantizeConfig', 'SwitchableBatchNorm', 'get_bits',
    'load_int', 'quantize_model', 'save_int', 'set_bits', 'set_layer_bits',
    'use_bits'
]
