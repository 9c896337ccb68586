"""Build a model from an mmdrq config and load a trained one: what tools,
benchmarks and tests start from (as ``mmdet.apis``)."""
import os.path as osp

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import CheckpointLoader

from mmdrq.engine.checkpoint_hook import (check_state_digest,
                                          check_training_checkpoint)
from mmdrq.engine.strict_load import check_checkpoint
from mmdrq.models import architecture_of
from mmdrq.quantization import quantize_model


def read_config(path: str, cfg_options=None) -> Config:
    """``Config.fromfile(path)`` with ``cfg_options`` merged; a missing file
    or a syntax error names the config (MMEngine reports '<unknown>')."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config {path!r} does not exist')
    try:
        cfg = Config.fromfile(path)
    except SyntaxError as e:
        where = f' (line {e.lineno}: {(e.text or "").strip()!r})' \
            if e.filename == '<unknown>' else f' ({e.filename}:{e.lineno})'
        raise SyntaxError(f'config {path!r} or one of its _base_ files has '
                          f'a syntax error: {e.msg}{where}') from None
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def build_model_from_config(cfg: Config):
    """The model a config describes, built as the Runner builds it (a
    top-level ``data_preprocessor`` goes into ``cfg.model``), plus the
    converted architecture inside it. Weights are not loaded.

    Either ``cfg.model`` is mmdrq's QAT wrapper, or it is a plain model and
    ``quantizer=dict(...)`` at the top level says how to convert it.
    """
    init_default_scope(cfg.get('default_scope', 'mmdrq'))
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    if architecture_of(model) is not model:  # mmdrq's QAT wrapper
        return model, architecture_of(model)
    if 'quantizer' not in cfg:
        raise KeyError(f'config model type {cfg.model.get("type")!r} is not '
                       'an mmdrq wrapper and the config has no top-level '
                       "'quantizer' key: nothing says how to quantize it")
    quantize_model(model, cfg.quantizer)
    return model, model


def load_trained(config: str, checkpoint: str, cfg_options=None):
    """(cfg, model, converted architecture) of a config with the weights of
    ``checkpoint`` loaded strictly (``check_checkpoint``: a checkpoint of
    another model, of other bits, or an FP32 one is an error, not a warning;
    so are a damaged file and an integer file): what the export and search
    tools start from."""
    cfg = read_config(config, cfg_options)
    cfg.launcher = 'none'
    model, architecture = build_model_from_config(cfg)
    check_training_checkpoint(
        checkpoint, 'it is exported already (tools/export_onnx.py takes '
        'it); give the training checkpoint it came from')
    # weights_only=True: mmdrq registers it for MMEngine's local files
    loaded = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    check_state_digest(loaded, checkpoint)
    state = check_checkpoint(model, loaded, f'checkpoint {checkpoint!r}')
    model.load_state_dict(state, strict=True)
    return cfg, model, architecture
