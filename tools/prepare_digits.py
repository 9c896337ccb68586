"""Write scikit-learn's handwritten digits (real data, shipped with sklearn,
no download) as an mmpretrain CustomDataset: ``ROOT/{train,val}/<digit>/
<index>.png``, 8x8 grayscale scaled to 0..255. Every fifth image goes to val.

    python tools/prepare_digits.py [--root data/digits]
"""
import argparse
import os
import os.path as osp

import numpy as np


def write_digits(root: str) -> dict:
    """Write the PNG files (skipped if already there); return split sizes."""
    import cv2
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    counts = {'train': 0, 'val': 0}
    for index, (image, label) in enumerate(zip(images, digits.target)):
        split = 'val' if index % 5 == 4 else 'train'
        folder = osp.join(root, split, str(label))
        os.makedirs(folder, exist_ok=True)
        path = osp.join(folder, f'{index:04d}.png')
        if not osp.exists(path):
            tmp = path + '.tmp.png'
            cv2.imwrite(tmp, image)
            os.replace(tmp, path)
        counts[split] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--root', default='data/digits')
    args = parser.parse_args()
    counts = write_digits(args.root)
    print(f'digits written to {args.root}: {counts}')


if __name__ == '__main__':
    main()
