"""Export a trained mmdrq model as an integer checkpoint.

    python tools/export_int.py CONFIG CKPT OUT [--cfg-options k=v ...]

CONFIG is the training config: either ``model`` is mmdrq's QAT wrapper, or
``model`` is a plain OpenMMLab model and ``quantizer=dict(bits=...)`` sits at
the top level. CKPT is an MMEngine checkpoint (or a bare state dict) of the
converted model. OUT receives INT-h weights plus scales (see mmdrq.save_int),
written atomically; with ``--subnet FILE`` the SubNet's per-layer bits are
recorded and applied on load.
"""
import argparse
import os

from mmengine.config import DictAction

import mmdrq
from mmdrq.engine.loops import load_subnet
from mmdrq.tools_common import load_trained


def main():
    parser = argparse.ArgumentParser(description='Export INT-h checkpoint')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--subnet', help='SubNet JSON (layer_bits) to record: '
                        'load_int then switches to it')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args()
    _, _, quantized = load_trained(args.config, args.checkpoint,
                                   args.cfg_options)
    layer_bits = load_subnet(args.subnet) if args.subnet else None
    sizes = mmdrq.save_int(quantized, args.out, layer_bits=layer_bits)
    stored = sizes['int_bytes'] + sizes['scale_bytes']
    print(f'wrote {args.out}: {os.path.getsize(args.out):,} bytes; quantized '
          f'layers {stored:,} bytes vs {sizes["fp32_bytes"]:,} FP32 '
          f'({stored / sizes["fp32_bytes"]:.3f})')


if __name__ == '__main__':
    main()
