from .multi_precision import (MultiPrecisionQAT, MultiPrecisionQATDDP,
                              architecture_of, qat_model_of, unwrap_model)
from .train_step import PerBitOptimWrapper, check_optim_bits

__all__ = [
    'MultiPrecisionQAT', 'MultiPrecisionQATDDP', 'PerBitOptimWrapper',
    'architecture_of', 'check_optim_bits', 'qat_model_of', 'unwrap_model'
]
