"""Export a trained mmdrq model to ONNX (QDQ form), one file per bit.

    python tools/export_onnx.py CONFIG CKPT --out-dir DIR [--bits 8 4 2]
        [--subnet s.json ...] [--input-shape 1 3 224 224]
        [--target onnxruntime|tensorrt] [--cfg-options k=v ...]

CKPT is an MMEngine checkpoint of the converted model or an integer file
(tools/export_int.py). Each bit's weights are the stored INT-h integers
after the second rounding, in int8 initializers; DIR receives
``w<b>a<b>.onnx`` per bit, ``<subnet>.onnx`` per SubNet and ``meta.json``.
The graph input is the tensor after the model's data preprocessor, with a
dynamic batch; the outputs are the model's ``mode='tensor'`` outputs.
``--target tensorrt`` writes int8-only Q/DQ (see docs/deploy.md).
"""
import argparse
import os.path as osp

from mmengine.config import DictAction

import mmdrq  # noqa: F401 (registers mmdrq's modules)
from mmdrq.deploy.folder import check_out_dir
from mmdrq.deploy.pipeline import (checkpoint_info, export_to_folder,
                                   load_for_export)
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
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    check_out_dir(args.out_dir)
    subnets = {osp.splitext(osp.basename(p))[0]: load_subnet(p)
               for p in args.subnet}
    _, model = load_for_export(args.config, args.checkpoint,
                               args.cfg_options)
    bits = args.bits if args.bits is not None else \
        ([] if subnets else list(model_bits(model)))
    meta = export_to_folder(model, args.out_dir, bits, subnets,
                            args.input_shape,
                            info=checkpoint_info(args.config, args.checkpoint),
                            target=args.target)
    for entry in meta['exports']:
        size = osp.getsize(osp.join(args.out_dir, entry['file']))
        print(f'{entry["file"]}: {size:,} bytes, largest |ORT - PyTorch| on '
              f'a random input {entry["probe_max_abs_diff"]:.3g}')


if __name__ == '__main__':
    main()
