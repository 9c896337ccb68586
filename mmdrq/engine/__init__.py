from .alrs import (ALRSAmpOptimWrapper, ALRSOptimWrapper, fixed_eta)
from .alrs_constructor import ALRSOptimWrapperConstructor
from .checkpoint_hook import (AtomicCheckpointHook, check_resumable,
                              resume_checkpoint)
from .freeze_bn_hook import FreezeBNStatsHook
from .hasb_hook import HASBHook, sigma_schedule
from .loops import MultiBitTestLoop, MultiBitValLoop
from .strict_load import StrictLoadHook, check_checkpoint
from .subnet_finetune_hook import SubNetFineTuneHook

__all__ = [
    'ALRSAmpOptimWrapper', 'ALRSOptimWrapper', 'ALRSOptimWrapperConstructor',
    'HASBHook', 'MultiBitTestLoop', 'MultiBitValLoop', 'StrictLoadHook',
    'SubNetFineTuneHook',
    'check_checkpoint', 'fixed_eta', 'sigma_schedule',
    'AtomicCheckpointHook', 'FreezeBNStatsHook', 'check_resumable', 'resume_checkpoint'
]
