"""mmdrq's built-in example: quantize a real mmpretrain ResNet-18, switch it
through every bit-width, export and reload the integer checkpoint, and print
a table. Runs offline on the CPU in well under a minute.

    python tools/demo.py [--bits 8 6 4 2] [--work-dir work_dirs/demo]

The network is mmpretrain's own ResNet-18 config (random init: no download);
the inputs are random images. The table shows, per bit: the output error vs
the FP32 model, how often the top-1 class agrees with FP32, whether the
reloaded integer model gives the very same outputs, and the stored bytes.
"""
import argparse
import copy
import os
import os.path as osp
import tempfile

import torch

import mmdrq


def build_resnet18():
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    with tempfile.TemporaryDirectory() as tmp:
        path = osp.join(tmp, 'resnet18.py')
        with open(path, 'w') as f:
            f.write("_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n"
                    "model = dict(backbone=dict(init_cfg=None))\n")
        cfg = Config.fromfile(path)
    init_default_scope('mmpretrain')
    return MODELS.build(cfg.model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--bits', type=int, nargs='+', default=[8, 6, 4, 2])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    os.makedirs(args.work_dir, exist_ok=True)

    fp32 = build_resnet18()
    images = torch.randn(args.batch, 3, 224, 224)
    # A few train-mode passes give the BN layers real running statistics.
    with torch.no_grad():
        fp32.train()
        for _ in range(3):
            fp32(torch.randn(args.batch, 3, 224, 224), mode='tensor')
    fp32.eval()
    fp_path = osp.join(args.work_dir, 'resnet18_fp32.pth')
    torch.save(fp32.state_dict(), fp_path)
    with torch.no_grad():
        reference = fp32(images, mode='tensor')

    model = mmdrq.quantize_model(copy.deepcopy(fp32), bits=args.bits)
    model.eval()
    outputs = {}
    with torch.no_grad():
        for bit in args.bits:
            with mmdrq.use_bits(model, bit):
                outputs[bit] = model(images, mode='tensor')

    int_path = osp.join(args.work_dir, 'resnet18_int.pth')
    sizes = mmdrq.save_int(model, int_path)
    reloaded = mmdrq.quantize_model(build_resnet18(), bits=args.bits)
    mmdrq.load_int(reloaded, int_path)
    reloaded.eval()

    stored = sizes['int_bytes'] + sizes['scale_bytes']
    print(f'\nmmpretrain ResNet-18, bits {args.bits}, stored at '
          f'{args.bits[0]} bits, batch of {args.batch} random images\n')
    header = ('bit', 'rel. error vs FP32', 'top-1 agrees', 'reload exact')
    print('| ' + ' | '.join(header) + ' |')
    print('|' + '|'.join('---' for _ in header) + '|')
    all_exact = True
    with torch.no_grad():
        for bit in args.bits:
            with mmdrq.use_bits(reloaded, bit):
                again = reloaded(images, mode='tensor')
            exact = torch.equal(again, outputs[bit])
            all_exact &= exact
            error = ((outputs[bit] - reference).norm() /
                     reference.norm()).item()
            agree = (outputs[bit].argmax(1) == reference.argmax(1)).float()
            print(f'| w{bit}a{bit} | {error:.4f} | {agree.mean():.0%} | '
                  f'{"yes" if exact else "NO"} |')
    print(f'\nquantized layers: {stored:,} bytes stored (integers + scales) '
          f'vs {sizes["fp32_bytes"]:,} FP32 = '
          f'{stored / sizes["fp32_bytes"]:.3f}')
    print(f'whole file: {os.path.getsize(int_path):,} bytes vs FP32 '
          f'state_dict file {os.path.getsize(fp_path):,} = '
          f'{os.path.getsize(int_path) / os.path.getsize(fp_path):.3f} '
          '(FP layers, per-bit BN and metadata included)')
    print(f'integer checkpoint: {int_path}')
    if not all_exact:
        raise SystemExit('reloaded integer model differs from the original')


if __name__ == '__main__':
    main()
