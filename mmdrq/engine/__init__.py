from .alrs import (ALRSAmpOptimWrapper, ALRSOptimWrapper, fixed_eta)
from .alrs_constructor import ALRSOptimWrapperConstructor
from .hasb_hook import HASBHook, sigma_schedule
from .loops import MultiBitTestLoop, MultiBitValLoop

__all__ = [
    'ALRSAmpOptimWrapper', 'ALRSOptimWrapper', 'ALRSOptimWrapperConstructor', 'HASBHook',
    'MultiBitTestLoop', 'MultiBitValLoop', 'fixed_eta', 'sigma_schedule'
]
