"""From a config and a checkpoint (training or integer) to an export folder."""
import os.path as osp
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mmdrq.export.int_checkpoint import is_int_checkpoint, load_int
from mmdrq.quantization import model_bits, quantized_layers
from .folder import check_out_dir, export_name, write_folder
from .onnx_export import (OnnxExporter, at_bits, check_bits_setting,
                          check_exportable)
from .residual import check_residual_mode


def load_for_export(config: str, checkpoint: str, cfg_options=None):
    """(cfg, converted architecture in eval mode) with ``checkpoint``'s
    weights: an MMEngine checkpoint loaded strictly, or an integer file
    whose metadata must match the model (``load_int``)."""
    from mmengine.config import Config

    from mmdrq.apis import build_model_from_config, load_trained
    if is_int_checkpoint(checkpoint):
        cfg = Config.fromfile(config)
        if cfg_options:
            cfg.merge_from_dict(cfg_options)
        _, architecture = build_model_from_config(cfg)
        load_int(architecture, checkpoint)
    else:
        cfg, _, architecture = load_trained(config, checkpoint, cfg_options)
    check_exportable(architecture)
    return cfg, architecture.eval()


def calibration_batches(cfg, model, batches: int,
                        input_shape: Sequence[int]) -> list:
    """``batches`` batches of training images through the test pipeline
    (deploy-time transforms, images the metrics never see), shuffled with
    a fixed seed, after the model's data preprocessor."""
    import copy

    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.train_dataloader)
    if 'pipeline' not in loader_cfg.dataset:
        raise ValueError('calibration reads train_dataloader.dataset.'
                         'pipeline, which this config does not have (a '
                         'dataset wrapper?)')
    loader_cfg.dataset.pipeline = cfg.test_dataloader.dataset.pipeline
    loader_cfg.sampler = dict(type='DefaultSampler', shuffle=True, seed=0)
    loader_cfg.update(num_workers=0, persistent_workers=False)
    loader = Runner.build_dataloader(loader_cfg, seed=0)
    found = []
    for data in loader:
        inputs = model.data_preprocessor(data, False)['inputs']
        if tuple(inputs.shape[1:]) != tuple(input_shape[1:]):
            raise ValueError(
                f'calibration batch of shape {tuple(inputs.shape)} does not '
                f'match the export input shape {tuple(input_shape)}: give '
                '--input-shape as the test pipeline makes it')
        found.append(inputs.detach().float())
        if len(found) == batches:
            break
    return found


def _flat(outputs) -> list:
    return [t.detach().float().numpy()
            for t in pytree.tree_flatten(outputs)[0]]


def probe_difference(exporter: OnnxExporter, proto, bits, seed: int = 0):
    """Largest |ONNX Runtime - PyTorch| over the outputs on one random
    input (a sanity number for meta.json; the metric tests are the real
    check)."""
    from .runtime import make_session
    session = make_session(proto.SerializeToString())
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(exporter.input_shape, generator=generator)
    got = session.run(None, {'input': inputs.numpy()})
    with at_bits(exporter.model, bits):
        want = _flat(exporter.run_torch(inputs))
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


def export_to_folder(model, out_dir: str, bits: Sequence[int] = (),
                     subnets: Optional[Dict[str, Dict[str, int]]] = None,
                     input_shape=(1, 3, 224, 224), forward=None,
                     info: Optional[dict] = None,
                     target: str = 'onnxruntime', residual_qdq: str = 'none',
                     calibration=None, fp_weights: str = 'float32') -> dict:
    """Export ``model`` at each of ``bits`` and each SubNet (name -> layer
    bits) into ``out_dir``; every input is checked before anything is
    exported or written (``target``, ``residual_qdq``, ``calibration``,
    ``fp_weights``: see ``OnnxExporter``). Returns the folder's meta."""
    check_exportable(model)
    check_residual_mode(residual_qdq, calibration)
    settings = [(export_name(bit=b), b) for b in bits]
    settings += [(name, layer_bits)
                 for name, layer_bits in (subnets or {}).items()]
    if not settings:
        raise ValueError('nothing to export: give bits and/or SubNets')
    for _, setting in settings:
        check_bits_setting(model, setting)
    check_out_dir(out_dir)
    exporter = OnnxExporter(model, input_shape, forward, target,
                            residual_qdq, calibration, fp_weights)
    models, exports = {}, []
    for name, setting in settings:
        proto = exporter.export(setting)
        file = name + '.onnx'
        models[file] = proto
        layer_bits = setting if isinstance(setting, dict) else None
        exports.append(dict(
            name=name, file=file,
            bit=None if layer_bits else setting, layer_bits=layer_bits,
            probe_max_abs_diff=probe_difference(exporter, proto, setting)))
    with at_bits(model, settings[0][1]):
        example = exporter.run_torch(torch.zeros(exporter.input_shape))
    outputs = pytree.tree_flatten(example)[1]
    meta = dict(info or {}, model=type(model).__name__,
                model_bits=list(model_bits(model)), target=target,
                residual_qdq=residual_qdq, fp_weights=fp_weights,
                calibration_images=sum(len(b) for b in calibration or ()),
                quantized_layers=len(quantized_layers(model)),
                input_name='input', input_shape=list(exporter.input_shape),
                output_tree=pytree.treespec_dumps(outputs),
                folded_bn=exporter.folded)
    return write_folder(out_dir, models, exports, meta)


def checkpoint_info(config: str, checkpoint: str) -> dict:
    return dict(config=osp.abspath(config),
                checkpoint=osp.abspath(checkpoint),
                integer_checkpoint=is_int_checkpoint(checkpoint))
