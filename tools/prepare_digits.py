"""Write scikit-learn's handwritten digits (real data, shipped with sklearn,
no download) as an mmpretrain CustomDataset: ``ROOT/{train,val}/<digit>/
<index>.png``, 8x8 grayscale scaled to 0..255. Every fifth image goes to val.

    python tools/prepare_digits.py [--root data/digits]
"""
import argparse

from mmdrq.datasets import write_digits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='data/digits')
    args = parser.parse_args()
    counts = write_digits(args.root)
    print(f'digits written to {args.root}: {counts}')


if __name__ == '__main__':
    main()
