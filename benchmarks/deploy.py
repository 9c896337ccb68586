"""ONNX Runtime on this CPU: mmpretrain ResNet-18 at 224 px and mmdet
RetinaNet-R18 at 320 px, FP32 against the mmdrq QDQ exports at w8a8 and
w4a4 (int8 containers): the default (residual adds float, bit-equal to
PyTorch), ``residual_qdq='calibrated'`` (8-bit Q/DQ on the residual adds),
that with the layers kept FP (stem, classifier or prediction convs) in
float16 or in int8 (``fp_layers='int8'``: integer kernels there too), and
ONNX Runtime's own ``quantize_static`` on the same FP32 graph with the same
calibration images.

    python benchmarks/deploy.py [--out-dir work_dirs/deploy_bench]
        [--threads 1] [--rounds 7] [--batches 1 8] [--models resnet18 ...]

Random weights (latency and structure do not depend on them); the
quantizer scales are initialised by training-mode forwards on random
images, and the calibrated scales measured on 8 other random images. The
models are timed in turns (each round runs every model once per batch
size), and the median per model is reported, so load on the machine hits
all of them alike. Which convolutions ran as integer kernels comes from
ONNX Runtime's optimized graph: a QLinearConv is an integer kernel, a
Conv/FusedConv a float one. A ``SwitchableSession`` over ResNet-18's export
folder gives the cost of a bit's first use (session creation), of a later
switch, and the resident memory each loaded bit adds. Writes ``deploy.md``
and ``deploy.json``.
"""
import argparse
import json
import multiprocessing
import os
import os.path as osp
import statistics
import tempfile
import time

import numpy as np
import onnx
import torch

from mmdrq import quantize_model, set_bits
from mmdrq.deploy import (OnnxExporter, SwitchableSession,
                          export_to_folder, make_session)
from mmdrq.deploy.onnx_export import TensorForward
from mmdrq.utils.atomic import atomic_write

SIZE = 224
# name: (config, scope, input size)
MODELS = {
    'resnet18': ('mmpretrain::resnet/resnet18_8xb32_in1k.py', 'mmpretrain',
                 224),
    'retinanet_r18': ('mmdet::retinanet/retinanet_r18_fpn_1x_coco.py',
                      'mmdet', 320)}


def build_model(name: str = 'resnet18'):
    """The stock config's model, random weights, eval mode."""
    import importlib

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    config, scope, _ = MODELS[name]
    with tempfile.TemporaryDirectory() as folder:
        path = osp.join(folder, 'cfg.py')
        with open(path, 'w') as f:
            f.write(f'_base_ = {config!r}\n')
        cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry')
    torch.manual_seed(0)
    return registry.MODELS.build(cfg.model).eval()


def build_resnet18():
    return build_model('resnet18')


def quantized_copy(model, bits=(8, 4), size=SIZE):
    import copy
    quantized = quantize_model(copy.deepcopy(model), bits=list(bits))
    quantized.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bit in bits:
            set_bits(quantized, bit)
            quantized(torch.randn(4, 3, size, size, generator=generator),
                      mode='tensor')
    return quantized.eval()


def fp32_onnx(model, size=SIZE) -> onnx.ModelProto:
    """The FP32 model by the same exporter (BN folded by its optimizer)."""
    program = torch.onnx.export(
        TensorForward(model).eval(), (torch.zeros(2, 3, size, size), ),
        dynamo=True, opset_version=20, input_names=['input'],
        dynamic_shapes=({0: torch.export.Dim('batch')}, ), verbose=False)
    return program.model_proto


def ort_quantize_static(fp32: onnx.ModelProto, calibration, path: str):
    """ONNX Runtime's own post-training quantizer on the same FP32 graph
    and calibration images: QDQ, int8 weights per channel, uint8
    activations, MinMax (its defaults but per channel)."""
    from onnxruntime.quantization import (CalibrationDataReader,
                                          CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):

        def __init__(self):
            self.batches = iter([{'input': b[i:i + 1].numpy()}
                                 for b in calibration for i in range(len(b))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        raw, prepared = (osp.join(folder, f) for f in ('fp32.onnx',
                                                       'prep.onnx'))
        onnx.save(fp32, raw)
        quant_pre_process(raw, prepared)
        quantize_static(prepared, path, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def kernel_report(path: str, threads: int) -> dict:
    """Convolutions by kind in ONNX Runtime's optimized graph."""
    with tempfile.TemporaryDirectory() as folder:
        optimized = osp.join(folder, 'optimized.onnx')
        make_session(path, threads, 'integer', optimized_path=optimized)
        nodes = onnx.load(optimized).graph.node
    counts = {}
    for node in nodes:
        if node.op_type in ('QLinearConv', 'Conv', 'FusedConv',
                            'QLinearAdd', 'Add', 'Sum'):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def time_in_turns(paths: dict, batches, rounds: int, threads: int,
                  size=SIZE) -> dict:
    sessions = {name: make_session(path, threads, 'integer')
                for name, path in paths.items()}
    inputs = {b: np.random.default_rng(0).standard_normal(
        (b, 3, size, size), dtype=np.float32) for b in batches}
    times = {(name, b): [] for name in sessions for b in batches}
    for name, session in sessions.items():  # warm-up
        for b in batches:
            session.run(None, {'input': inputs[b]})
    for _ in range(rounds):
        for b in batches:
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {'input': inputs[b]})
                times[(name, b)].append(time.perf_counter() - start)
    return {key: statistics.median(values) * 1000
            for key, values in times.items()}


def resident_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def switch_costs(folder: str, threads: int) -> dict:
    """First use of each bit (session made lazily), then switches between
    loaded bits, with the resident memory after each first use."""
    session = SwitchableSession(folder, threads, 'integer')
    image = np.zeros((1, 3, SIZE, SIZE), np.float32)
    costs = dict(rss_mb_before=resident_mb())
    for bit in session.available:
        start = time.perf_counter()
        session.set_bits(bit).session()
        costs[f'first_use_ms_w{bit}'] = (time.perf_counter() - start) * 1e3
        session.run(image)
        costs[f'rss_mb_after_w{bit}'] = resident_mb()
    start = time.perf_counter()
    for _ in range(100):
        for bit in session.available:
            session.set_bits(bit).session()
    costs['switch_us'] = (time.perf_counter() - start) / (
        100 * len(session.available)) * 1e6
    return costs


def model_rows(name: str, args) -> tuple:
    """(table rows, results) of one model: every variant timed in turns."""
    size = MODELS[name][2]
    model = build_model(name)
    quantized = quantized_copy(model, size=size)
    shape = (1, 3, size, size)
    calibration = [torch.randn(8, 3, size, size,
                               generator=torch.Generator().manual_seed(2))]
    exporter = OnnxExporter(quantized, shape, graph='tensor')
    protos = {'FP32': fp32_onnx(model, size), 'w8a8': exporter.export(8),
              'w4a4': exporter.export(4)}
    for fp_layers, bits in (('float32', (8, 4)), ('float16', (8, )),
                            ('int8', (8, 4))):
        residual = OnnxExporter(quantized, shape, residual_qdq='calibrated',
                                calibration=calibration,
                                fp_layers=fp_layers, graph='tensor')
        suffix = '' if fp_layers == 'float32' else \
            f', FP layers {fp_layers}'
        for bit in bits:
            protos[f'w{bit}a{bit} residual{suffix}'] = residual.export(bit)
    paths = {}
    for label, proto in protos.items():
        file = label.replace(', ', '_').replace(' ', '_')
        paths[label] = osp.join(args.out_dir, f'{name}_{file}.onnx')
        data = proto.SerializeToString()
        atomic_write(paths[label], lambda f: f.write(data))
    paths['ORT quantize_static w8a8'] = osp.join(
        args.out_dir, f'{name}_ort_quantize_static.onnx')
    ort_quantize_static(protos['FP32'], calibration,
                        paths['ORT quantize_static w8a8'])
    latency = time_in_turns(paths, args.batches, args.rounds, args.threads,
                            size)
    fp32_kernels = kernel_report(paths['FP32'], args.threads)
    convs = fp32_kernels.get('Conv', 0) + fp32_kernels.get('FusedConv', 0)
    rows, results = [], {}
    fp_size = osp.getsize(paths['FP32'])
    for label, path in paths.items():
        kernels = kernel_report(path, args.threads)
        bytes_ = osp.getsize(path)
        result = dict(bytes=bytes_, size_ratio=bytes_ / fp_size,
                      kernels=kernels)
        for b in args.batches:
            result[f'ms_batch{b}'] = latency[(label, b)]
            result[f'ratio_batch{b}'] = latency[(label, b)] / \
                latency[('FP32', b)]
        results[label] = result
        cells = [f'{name} {label}',
                 f'{bytes_ / 1e6:.1f} MB ({bytes_ / fp_size:.3f})']
        cells += [f'{latency[(label, b)]:.1f} '
                  f'({result[f"ratio_batch{b}"]:.2f})'
                  for b in args.batches]
        cells.append('-' if label == 'FP32' else
                     f'{kernels.get("QLinearConv", 0)} of {convs}')
        rows.append(cells)
    return rows, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out-dir', default='work_dirs/deploy_bench')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--models', nargs='+', default=list(MODELS),
                        choices=list(MODELS))
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    rows, results = [], {}
    for name in args.models:
        model_table, results[name] = model_rows(name, args)
        rows += model_table
    header = ['model', 'file (vs FP32)'] + \
        [f'ms, batch {b} (vs FP32)' for b in args.batches] + \
        ['convs (calls) as integer kernels']
    table = '\n'.join(['| ' + ' | '.join(header) + ' |',
                       '|---' * len(header) + '|'] +
                      ['| ' + ' | '.join(r) + ' |' for r in rows])
    note = (f'ONNX Runtime {__import__("onnxruntime").__version__}, '
            f'{args.threads} thread(s), median of {args.rounds} rounds '
            'timed in turns (OMP_NUM_THREADS=1 for PyTorch). "residual": '
            'residual adds quantized (--residual-qdq calibrated); "FP '
            'layers int8": --fp-layers int8')
    switching = None
    if 'resnet18' in args.models:
        quantized = quantized_copy(build_model('resnet18'))
        folder = osp.join(args.out_dir, 'resnet18_export')
        export_to_folder(quantized, folder, [8, 4], None,
                         (1, 3, SIZE, SIZE), overwrite=True)
        # in a fresh process: the memory numbers are the sessions' own
        with multiprocessing.get_context('spawn').Pool(1) as pool:
            switching = pool.apply(switch_costs, (folder, args.threads))
        bits = [k.split('_w')[-1] for k in switching
                if k.startswith('first')]
        note += ('. ResNet-18 SwitchableSession: first use (session made) ' +
                 ', '.join(f'w{b}: {switching["first_use_ms_w" + b]:.0f} ms'
                           for b in bits) +
                 f'; a switch between loaded bits '
                 f'{switching["switch_us"]:.1f} us; resident memory ' +
                 ' -> '.join([f'{switching["rss_mb_before"]:.0f}'] +
                             [f'{switching["rss_mb_after_w" + b]:.0f}'
                              for b in bits]) +
                 ' MB (before, after each bit)')
    text = f'{table}\n\n{note}\n'
    atomic_write(osp.join(args.out_dir, 'deploy.md'),
                 lambda f: f.write(text.encode()))
    data = json.dumps(dict(results=results, switching=switching,
                           note=note), indent=1).encode()
    atomic_write(osp.join(args.out_dir, 'deploy.json'),
                 lambda f: f.write(data))
    print(text)


if __name__ == '__main__':
    main()
