"""Export a trained mmdrq model to ONNX (QDQ form), one file per bit.

    python tools/export_onnx.py CONFIG CKPT --out-dir DIR [--bits 8 4 2]
        [--subnet s.json ...] [--input-shape 1 3 224 224]
        [--target onnxruntime|tensorrt] [--residual-qdq none|calibrated]
        [--calib-batches 4] [--fp-weights float32|float16|int8]
        [--cfg-options k=v ...]

CKPT is an MMEngine checkpoint of the converted model or an integer file
(tools/export_int.py). Each bit's weights are the stored INT-h integers
after the second rounding, in int8 initializers; DIR receives
``w<b>a<b>.onnx`` per bit, ``<subnet>.onnx`` per SubNet and ``meta.json``.
The graph input is the tensor after the model's data preprocessor, with a
dynamic batch; the outputs are the model's ``mode='tensor'`` outputs.
``--target tensorrt`` writes int8-only Q/DQ (see docs/deploy.md).
``--residual-qdq calibrated`` quantizes the residual adds at 8 bits with
scales from ``--calib-batches`` training batches (test pipeline), so ONNX
Runtime runs every quantized conv as an integer kernel; the default
``none`` keeps them float and the graph computes what PyTorch computes.
``--fp-weights`` stores the layers kept FP smaller (not bit-equal).
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.deploy.folder import check_out_dir
from mmdrq.deploy.onnx_export import FP_WEIGHTS
from mmdrq.deploy.pipeline import (calibration_batches, checkpoint_info,
                                   export_to_folder, load_for_export)
from mmdrq.deploy.residual import RESIDUAL_MODES
from mmdrq.search.subnet import load_subnet
from mmdrq.quantization import model_bits


def main():
    parser = argparse.ArgumentParser(description='Export per-bit ONNX')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--bits', type=int, nargs='+',
                        help='bit-widths to export (default: all)')
    parser.add_argument('--subnet', nargs='+', default=[],
                        help='SubNet JSON files (layer_bits) to export')
    parser.add_argument('--input-shape', type=int, nargs=4,
                        default=[1, 3, 224, 224], metavar=('N', 'C', 'H', 'W'))
    parser.add_argument('--target', default='onnxruntime',
                        choices=['onnxruntime', 'tensorrt'])
    parser.add_argument('--residual-qdq', default='none',
                        choices=RESIDUAL_MODES,
                        help='none: residual adds float, bit-equal to '
                        'PyTorch; calibrated: 8-bit Q/DQ on them (every '
                        'conv an integer kernel in ONNX Runtime)')
    parser.add_argument('--calib-batches', type=int, default=4,
                        help='training batches for --residual-qdq '
                        'calibrated')
    parser.add_argument('--fp-weights', default='float32',
                        choices=FP_WEIGHTS,
                        help='storage of the layers kept FP')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    if args.calib_batches < 1:
        parser.error(f'--calib-batches must be >= 1, got '
                     f'{args.calib_batches}')
    check_out_dir(args.out_dir)
    subnets = {osp.splitext(osp.basename(p))[0]: load_subnet(p)
               for p in args.subnet}
    cfg, model = load_for_export(args.config, args.checkpoint,
                                 args.cfg_options)
    calibration = None
    if args.residual_qdq == 'calibrated':
        calibration = calibration_batches(cfg, model, args.calib_batches,
                                          args.input_shape)
    bits = args.bits if args.bits is not None else \
        ([] if subnets else list(model_bits(model)))
    meta = export_to_folder(model, args.out_dir, bits, subnets,
                            args.input_shape,
                            info=checkpoint_info(args.config, args.checkpoint),
                            target=args.target,
                            residual_qdq=args.residual_qdq,
                            calibration=calibration,
                            fp_weights=args.fp_weights)
    for entry in meta['exports']:
        size = osp.getsize(osp.join(args.out_dir, entry['file']))
        print(f'{entry["file"]}: {size:,} bytes, largest |ORT - PyTorch| on '
              f'a random input {entry["probe_max_abs_diff"]:.3g}')


if __name__ == '__main__':
    main()
