"""Export a trained mmdrq model as an integer checkpoint.

    python tools/export_int.py CONFIG CKPT OUT [--cfg-options k=v ...]

CONFIG is the training config: either ``model`` is mmdrq's QAT wrapper, or
``model`` is a plain OpenMMLab model and ``quantizer=dict(bits=...)`` sits at
the top level. CKPT is an MMEngine checkpoint (or a bare state dict) of the
converted model. OUT receives INT-h weights plus scales (see mmdrq.save_int),
written atomically.
"""
import argparse
import os

from mmengine.config import Config, DictAction
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import load_checkpoint

import mmdrq


def build_quantized(cfg: Config):
    """The converted model a config describes (weights not loaded)."""
    init_default_scope(cfg.get('default_scope', 'mmdrq'))
    model = MODELS.build(cfg.model)
    architecture = getattr(model, 'architecture', None)
    if architecture is not None and \
            getattr(architecture, 'mmdrq_config', None) is not None:
        return model, architecture
    if 'quantizer' not in cfg:
        raise KeyError(f'config model type {cfg.model.get("type")!r} is not '
                       'an mmdrq wrapper and the config has no top-level '
                       "'quantizer' key: nothing says how to quantize it")
    mmdrq.quantize_model(model, cfg.quantizer)
    return model, model


def main():
    parser = argparse.ArgumentParser(description='Export INT-h checkpoint')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    model, quantized = build_quantized(cfg)
    load_checkpoint(model, args.checkpoint, map_location='cpu', strict=True)
    sizes = mmdrq.save_int(quantized, args.out)
    stored = sizes['int_bytes'] + sizes['scale_bytes']
    print(f'wrote {args.out}: {os.path.getsize(args.out):,} bytes; quantized '
          f'layers {stored:,} bytes vs {sizes["fp32_bytes"]:,} FP32 '
          f'({stored / sizes["fp32_bytes"]:.3f})')


if __name__ == '__main__':
    main()
