from .act_quantizer import ActQuantizer
from .bit_control import (check_layer_bits, get_bits, model_bits, set_bits,
                          set_layer_bits, use_bits, use_setting)
from .bitwidths import check_bit, check_bits
from .config import QuantizeConfig
from .convert import quantize_model
from .learned_scale import LearnedScaleQuantizer
from .layers import (BitSwitchable, QConv2d, QLinear, QuantLayer,
                     quantized_layers, quantizers_ready, recording_calls)
from .switchable_bn import SwitchableBatchNorm
from .transitional_bn import TransitionalBatchNorm, to_transitional
from .forms import form_of, layer_forms, register_form
from .weight_layers import SwappedWeightLayer
from .weight_quantizer import DoubleRoundingQuantizer, shared_rounding

__all__ = [
    'ActQuantizer', 'BitSwitchable', 'DoubleRoundingQuantizer', 'form_of',
    'layer_forms', 'register_form',
    'LearnedScaleQuantizer', 'QConv2d',
    'QLinear', 'QuantLayer', 'QuantizeConfig', 'SwappedWeightLayer',
    'SwitchableBatchNorm',
    'TransitionalBatchNorm', 'check_bit', 'check_bits', 'check_layer_bits',
    'get_bits', 'model_bits',
    'quantize_model', 'quantized_layers', 'quantizers_ready',
    'recording_calls', 'set_bits', 'set_layer_bits', 'shared_rounding',
    'to_transitional', 'use_bits', 'use_setting'
]
