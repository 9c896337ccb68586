from .multi_precision import (MultiPrecisionQAT, MultiPrecisionQATDDP,
                              bit_tag)

__all__ = ['MultiPrecisionQAT', 'MultiPrecisionQATDDP', 'bit_tag']
