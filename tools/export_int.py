"""Export a trained mmdrq model as an integer checkpoint.

    python tools/export_int.py CONFIG CKPT OUT [--cfg-options k=v ...]

CONFIG is the training config: either ``model`` is mmdrq's QAT wrapper, or
``model`` is a plain OpenMMLab model and ``quantizer=dict(bits=...)`` sits at
the top level. CKPT is an MMEngine checkpoint (or a bare state dict) of the
converted model. OUT receives INT-h weights plus scales (see mmdrq.save_int),
written atomically; with ``--subnet FILE`` the SubNet's per-layer bits are
recorded and applied on load. An existing OUT is replaced only if it is an
mmdrq integer checkpoint and not CKPT itself, unless ``--force``.
"""
import argparse
import os


import mmdrq
from mmdrq.export.int_checkpoint import is_int_checkpoint
from mmdrq.tools_common import add_cfg_options
from mmdrq.search.subnet import load_subnet
from mmdrq.apis import load_trained


def check_output(checkpoint: str, out: str, force: bool):
    """Refuse, before any work, an OUT whose loss could not be undone: the
    input checkpoint itself (by any path) or a file that is not an mmdrq
    integer checkpoint (a training checkpoint, say)."""
    if os.path.isdir(out):
        raise IsADirectoryError(f'OUT {out!r} is a directory')
    if not os.path.exists(out) or force:
        return
    if os.path.exists(checkpoint) and os.path.samefile(checkpoint, out):
        raise FileExistsError(
            f'OUT {out!r} is the input checkpoint {checkpoint!r}: exporting '
            'would replace it (its FP weights and optimizer state) by the '
            'integer file; choose another OUT, or pass --force')
    if not is_int_checkpoint(out):
        raise FileExistsError(
            f'OUT {out!r} exists and is not an mmdrq integer checkpoint; '
            'choose another OUT, or pass --force to replace it')


def main():
    parser = argparse.ArgumentParser(description='Export INT-h checkpoint')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('out')
    parser.add_argument('--subnet', help='SubNet JSON (layer_bits) to record: '
                        'load_int then switches to it')
    parser.add_argument('--force', action='store_true',
                        help='replace OUT even if it is CKPT or not an mmdrq '
                        'integer checkpoint')
    add_cfg_options(parser)
    args = parser.parse_args()
    check_output(args.checkpoint, args.out, args.force)
    _, _, quantized = load_trained(args.config, args.checkpoint,
                                   args.cfg_options)
    layer_bits = load_subnet(args.subnet, quantized) \
        if args.subnet else None
    sizes = mmdrq.save_int(quantized, args.out, layer_bits=layer_bits)
    stored = sizes['int_bytes'] + sizes['scale_bytes']
    print(f'wrote {args.out}: {os.path.getsize(args.out):,} bytes; quantized '
          f'layers {stored:,} bytes vs {sizes["fp32_bytes"]:,} FP32 '
          f'({stored / sizes["fp32_bytes"]:.3f})')


if __name__ == '__main__':
    main()
