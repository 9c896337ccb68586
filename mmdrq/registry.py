"""mmdrq's registries: children of MMEngine's root registries.

Being children (scope ``mmdrq``) lets a config of any OpenMMLab package name
``type='mmdrq.MultiPrecisionQAT'`` or set ``_scope_='mmdrq'``; ``locations``
make the registries import the modules that fill them on first use.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as \
    MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import OPTIM_WRAPPERS as MMENGINE_OPTIM_WRAPPERS
from mmengine.registry import Registry

MODELS = Registry(
    'model', parent=MMENGINE_MODELS,
    locations=['mmdrq.quantization', 'mmdrq.models', 'mmdrq.llm'])
MODEL_WRAPPERS = Registry(
    'model_wrapper', parent=MMENGINE_MODEL_WRAPPERS,
    locations=['mmdrq.models'])
OPTIM_WRAPPERS = Registry(
    'optim_wrapper', parent=MMENGINE_OPTIM_WRAPPERS,
    locations=['mmdrq.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, locations=['mmdrq.engine'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, locations=['mmdrq.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, locations=['mmdrq.engine'])
# the language-model extra's (mmdrq.llm imports transformers only when a
# model is built)
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS,
                    locations=['mmdrq.llm'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, locations=['mmdrq.llm'])
