from .alrs import (ALRSAmpOptimWrapper, ALRSOptimWrapper, fixed_eta)
from .alrs_constructor import ALRSOptimWrapperConstructor
from .loops import MultiBitTestLoop, MultiBitValLoop

__all__ = [
    'ALRSAmpOptimWrapper', 'ALRSOptimWrapper', 'ALRSOptimWrapperConstructor',
    'MultiBitTestLoop', 'MultiBitValLoop', 'fixed_eta'
]
