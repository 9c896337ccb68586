from .multi_precision import (MultiPrecisionQAT, MultiPrecisionQATDDP,
                              PerBitOptimWrapper, architecture_of, bit_tag,
                              check_optim_bits, qat_model_of, unwrap_model)

__all__ = [
    'MultiPrecisionQAT', 'MultiPrecisionQATDDP', 'PerBitOptimWrapper',
    'architecture_of', 'bit_tag', 'check_optim_bits', 'qat_model_of',
    'unwrap_model'
]
