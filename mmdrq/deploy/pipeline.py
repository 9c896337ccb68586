"""From a config and a checkpoint (training or integer) to an export folder."""
import hashlib
import os.path as osp
import re
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from mmdrq.export.int_checkpoint import is_int_checkpoint, load_int
from mmdrq.quantization import model_bits, quantized_layers, use_setting
from mmdrq.quantization.bitwidths import bit_name, check_bit_selection
from mmdrq.quantization.integers import CONTAINER_BIT
from mmdrq_runtime.artifact import check_file_name
from mmdrq.utils.checks import check_choice
from .folder import LAYOUTS, check_out_dir, pack, write_folder
from .onnx_export import (OnnxExporter, check_bits_setting,
                          check_exportable)
from .pipeline_graph import pipeline_feeds, torch_pipeline
from .residual import check_residual_mode


def load_for_export(config: str, checkpoint: str, cfg_options=None):
    """(cfg, converted architecture in eval mode) with ``checkpoint``'s
    weights: an MMEngine checkpoint loaded strictly, or an integer file
    whose metadata must match the model (``load_int``)."""
    from mmdrq.apis import build_model_from_config, load_trained, read_config
    if is_int_checkpoint(checkpoint):
        cfg = read_config(config, cfg_options)
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


def test_input_shape(cfg, model) -> tuple:
    """(1, C, H, W) of the first test batch after the data preprocessor:
    the export's default input shape."""
    import copy

    from mmengine.runner import Runner
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.update(num_workers=0, persistent_workers=False)
    data = next(iter(Runner.build_dataloader(loader_cfg, seed=0)))
    inputs = model.data_preprocessor(data, False)['inputs']
    return (1, ) + tuple(inputs.shape[1:])


def _flat(outputs) -> list:
    return [t.detach().numpy() if not t.is_floating_point() else
            t.detach().float().numpy()
            for t in pytree.tree_flatten(outputs)[0]]


def probe_difference(exporter: OnnxExporter, proto, bits, seed: int = 0):
    """ONNX Runtime against PyTorch on one random input: the largest
    absolute difference of the float outputs, the share of differing
    values of the integer ones (labels), whichever is larger (a sanity
    number for meta.json; the metric tests are the real check)."""
    from mmdrq_runtime.session import make_session
    session = make_session(proto.SerializeToString())
    generator = torch.Generator().manual_seed(seed)
    inputs = exporter.example(exporter.input_shape, generator)
    feeds = dict(pipeline_feeds(exporter.pipeline, inputs.shape),
                 input=inputs.numpy())
    got = session.run(None, feeds)
    with use_setting(exporter.model, bits):
        want = exporter.run_torch(inputs)
        if exporter.task is not None:
            want = torch_pipeline(exporter.task, want, inputs, exporter.model)
    if exporter.task == 'detection':  # per image: the sorted kept scores
        got = [np.sort(s[s >= 0])[::-1] for s in got[1]]
        want = [w.sort(descending=True)[0] for w in want]
        if any(len(g) != len(w) for g, w in zip(got, want)):
            return 1.0
    differences = [float(np.mean(g != w)) if g.dtype.kind in 'iu' else
                   float(np.abs(g - w).max())
                   for g, w in zip(got, _flat(want))]
    return max(differences)


def check_subnet_name(name: str) -> str:
    """A SubNet's name names its files: a plain name, not a bit's."""
    check_file_name(name)
    if re.fullmatch(r'w\d+a\d+', name):
        raise ValueError(f'SubNet name {name!r} looks like a bit setting; '
                         'rename its file')
    return name


def model_identity(model) -> str:
    """A digest of the model's state dict keys, shapes and dtypes and its
    bits: equal for the same model retrained, different for another."""
    digest = hashlib.sha256(repr(list(model_bits(model))).encode())
    for key, value in model.state_dict().items():
        digest.update(f'{key}:{tuple(value.shape)}:{value.dtype};'.encode())
    return digest.hexdigest()


def export_to_folder(model, out_dir: str, bits: Sequence[int] = (),
                     subnets: Optional[Dict[str, Dict[str, int]]] = None,
                     input_shape=(1, 3, 224, 224), forward=None,
                     info: Optional[dict] = None,
                     target: str = 'onnxruntime', residual_qdq: str = 'none',
                     calibration=None, fp_layers: str = 'float32',
                     layout: str = 'single', overwrite: bool = False,
                     graph: str = 'tensor') -> dict:
    """Export ``model`` at each of ``bits`` and each SubNet (name -> layer
    bits) into ``out_dir``; every input is checked before anything is
    exported or written (``target``, ``residual_qdq``, ``calibration``,
    ``fp_layers``, ``graph``: see ``OnnxExporter``). ``layout='single'``
    stores one
    graph with the stored integers for every setting, ``'per_bit'`` a
    full
    file per setting (for runtimes that need one); ``overwrite`` replaces
    another model's export. Returns the folder's meta."""
    check_exportable(model)
    check_residual_mode(residual_qdq, calibration)
    check_choice('layout', layout, LAYOUTS)
    bits = check_bit_selection(bits, model_bits(model), 'bit')
    settings = [(bit_name(b), b) for b in bits]
    settings += [(check_subnet_name(name), layer_bits)
                 for name, layer_bits in (subnets or {}).items()]
    if not settings:
        raise ValueError('nothing to export: give bits and/or SubNets')
    for _, setting in settings:
        check_bits_setting(model, setting)
    identity = model_identity(model)
    check_out_dir(out_dir, identity, overwrite)
    exporter = OnnxExporter(model, input_shape, forward, target,
                            residual_qdq, calibration, fp_layers, graph)
    models, integers, entries = {}, {}, []
    for name, setting in settings:
        models[name], integers[name] = exporter.export_setting(setting)
        layer_bits = setting if isinstance(setting, dict) else None
        entries.append(dict(
            name=name, bit=None if layer_bits else setting,
            layer_bits=layer_bits, probe=probe_difference(
                exporter, models[name], setting)))
    stored = model_bits(model)[0]
    base = None
    if layout == 'single' and stored <= CONTAINER_BIT:
        name = bit_name(stored)
        base = models[name] if name in models else \
            exporter.export_setting(stored)[0]
    files, entries, specs = pack(entries, models, integers, base, layout)
    with use_setting(model, settings[0][1]):
        example = exporter.run_torch(exporter.example(exporter.input_shape))
    outputs = pytree.tree_flatten(example)[1]
    graph_input = exporter.skeleton().graph.input[0].type.tensor_type.shape
    meta = dict(info or {}, model=type(model).__name__,
                model_bits=list(model_bits(model)), target=target,
                residual_qdq=residual_qdq, fp_layers=fp_layers,
                calibration_images=sum(len(b) for b in calibration or ()),
                quantized_layers=len(quantized_layers(model)),
                layout=layout, input_name='input',
                input_shape=list(exporter.input_shape),
                input_dtype='int64' if exporter.tokens else 'float32',
                input_dims=[d.dim_value if d.HasField('dim_value') else None
                            for d in graph_input.dim],
                output_tree=pytree.treespec_dumps(outputs),
                pipeline=exporter.pipeline,
                folded_bn=exporter.folded, integers=specs, settings=entries)
    return write_folder(out_dir, files, meta, models, identity, overwrite)


def checkpoint_info(config: str, checkpoint: str) -> dict:
    # file names only: an export carries no paths of this machine
    return dict(config=osp.basename(config),
                checkpoint=osp.basename(osp.normpath(checkpoint)),
                integer_checkpoint=is_int_checkpoint(checkpoint))
