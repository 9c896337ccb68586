"""Export a trained mmdrq model to ONNX (QDQ form): one artifact, every bit.

    python tools/export_onnx.py CONFIG CKPT --out-dir DIR [--bits 8 4 2]
        [--subnet s.json ...] [--input-shape 1 3 224 224 | 1 T]
        [--layout single|per_bit] [--overwrite]
        [--target onnxruntime|tensorrt] [--residual-qdq none|calibrated]
        [--calib-batches 4]
        [--fp-layers float32|float16|int8_weights|int8]
        [--cfg-options k=v ...]

CKPT is an MMEngine checkpoint of the converted model or an integer file
(tools/export_int.py). Each bit's weights are the stored INT-h integers
after the second rounding, in int8 initializers. DIR receives
``model.onnx`` (the graph with the stored integers), a small
``<setting>.npz`` of float values per other bit or SubNet (their integers
are derived from the stored ones when a session is made) and ``meta.json``
with every file's SHA-256; ``--layout per_bit`` writes a full
``<setting>.onnx`` per setting instead. DIR is written beside and swapped
in. The graph input is the tensor after the model's data preprocessor
(batch, height and width dynamic where the model allows). ``--graph``
``auto`` (default) appends the task's post-processing where it has one
(classifier scores and labels; segmentation labels at the image's size),
``tensor`` keeps the model's ``mode='tensor'`` outputs. The test-time
preprocessing goes into ``meta.json`` for ``mmdrq_runtime.Inferencer``.
``--target tensorrt`` writes int8-only Q/DQ (see docs/deploy.md).
``--residual-qdq calibrated`` quantizes the residual adds at 8 bits with
scales from ``--calib-batches`` training batches (test pipeline), so ONNX
Runtime runs every quantized conv as an integer kernel; the default
``none`` keeps them float and the graph computes what PyTorch computes.
``--fp-layers`` exports the layers kept FP (stem, classifier) smaller:
float16 or int8 weights, or ``int8`` (weights, inputs and conv outputs,
calibrated like the residuals: integer kernels there too). Only the
defaults are bit-equal to PyTorch.
"""
import argparse
import os.path as osp


import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.deploy.folder import LAYOUTS, check_out_dir
from mmdrq.tools_common import add_cfg_options, check_input_channels
from mmdrq.deploy.float_layers import FP_LAYERS
from mmdrq.deploy.pipeline_graph import GRAPHS
from mmdrq.deploy.preprocess_spec import preprocess_spec
from mmdrq.deploy.pipeline import (calibration_batches, checkpoint_info,
                                   export_to_folder, load_for_export,
                                   test_input_shape)
from mmdrq.deploy.residual import RESIDUAL_MODES
from mmdrq.search.subnet import load_subnet
from mmdrq.quantization import model_bits


def main():
    parser = argparse.ArgumentParser(description='Export per-bit ONNX')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--bits', type=int, nargs='+',
                        help='bit-widths to export (default: all, or none '
                        'when --subnet is given)')
    parser.add_argument('--subnet', nargs='+', default=[],
                        help='SubNet JSON files (layer_bits) to export')
    parser.add_argument('--input-shape', type=int, nargs='+',
                        metavar='SIZE',
                        help='N C H W (N T for a language model): example '
                        'input of the export (default: the first test '
                        'batch through the config\'s pipeline); batch, '
                        'height and width stay dynamic where the model '
                        'allows it')
    parser.add_argument('--layout', default='single', choices=LAYOUTS,
                        help='single: one graph with the stored integers, '
                        'every bit derived at load; per_bit: a full file '
                        'per bit or SubNet, for runtimes that need one')
    parser.add_argument('--graph', default='auto', choices=GRAPHS,
                        help='pipeline: the task\'s post-processing in the '
                        'graph (classification scores and labels, '
                        'segmentation labels at the image size); tensor: the '
                        'head tensors; auto: pipeline where the task has '
                        'one')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an export of another model in '
                        '--out-dir')
    parser.add_argument('--target', default='onnxruntime',
                        choices=['onnxruntime', 'tensorrt'])
    parser.add_argument('--residual-qdq', default='none',
                        choices=RESIDUAL_MODES,
                        help='none: residual adds float, bit-equal to '
                        'PyTorch; calibrated: 8-bit Q/DQ on them (every '
                        'conv an integer kernel in ONNX Runtime)')
    parser.add_argument('--calib-batches', type=int, default=4,
                        help='training batches for --residual-qdq '
                        'calibrated and --fp-layers int8')
    parser.add_argument('--fp-layers', default='float32',
                        choices=FP_LAYERS,
                        help='how the layers kept FP are exported')
    add_cfg_options(parser)
    args = parser.parse_args()
    if args.calib_batches < 1:
        parser.error(f'--calib-batches must be >= 1, got '
                     f'{args.calib_batches}')
    if args.input_shape and (min(args.input_shape) < 1 or
                             len(args.input_shape) not in (2, 4)):
        parser.error(f'--input-shape takes N C H W (or N T for a language '
                     f'model), sizes >= 1, got {args.input_shape}')
    check_out_dir(args.out_dir, overwrite=args.overwrite)
    subnets = {osp.splitext(osp.basename(p))[0]: load_subnet(p)
               for p in args.subnet}
    cfg, model = load_for_export(args.config, args.checkpoint,
                                 args.cfg_options)
    input_shape = args.input_shape or test_input_shape(cfg, model)
    tokens = getattr(model, 'export_inputs', None) == 'token_ids'
    if len(input_shape) != (2 if tokens else 4):
        raise ValueError(f'--input-shape {" ".join(map(str, input_shape))}:'
                         f' {type(model).__name__} takes '
                         f'{"N T (token ids)" if tokens else "N C H W"}')
    check_input_channels(model, input_shape)
    spec, refusal = preprocess_spec(cfg, model)
    calibration = None
    if args.residual_qdq == 'calibrated' or args.fp_layers == 'int8':
        calibration = calibration_batches(cfg, model, args.calib_batches,
                                          input_shape)
    bits = args.bits if args.bits is not None else \
        ([] if subnets else list(model_bits(model)))
    meta = export_to_folder(model, args.out_dir, bits, subnets,
                            input_shape,
                            info=dict(checkpoint_info(args.config,
                                                      args.checkpoint),
                                      preprocess=spec,
                                      preprocess_refusal=refusal),
                            target=args.target,
                            residual_qdq=args.residual_qdq,
                            calibration=calibration,
                            fp_layers=args.fp_layers, layout=args.layout,
                            overwrite=args.overwrite, graph=args.graph)
    for entry in meta['settings']:
        print(f'{entry["name"]}: ORT against PyTorch on a random input: '
              f'{entry["probe"]:.3g} (largest difference of scores, share '
              'of differing labels)')
    total = sum(osp.getsize(osp.join(args.out_dir, f)) for f in meta['files'])
    print(f'{args.out_dir}: {len(meta["settings"])} settings in '
          f'{len(meta["files"]) + 1} files, {total:,} bytes; input '
          f'{meta["input_dims"]} (None: dynamic)')


if __name__ == '__main__':
    main()
