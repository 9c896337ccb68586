"""Write scikit-learn's handwritten digits (real data, shipped with sklearn,
no download) as an mmpretrain CustomDataset: ``ROOT/{train,val}/<digit>/
<index>.png``, 8x8 grayscale scaled to 0..255. Every fifth image goes to val
(CLI: tools/prepare_digits.py)."""
import os
import os.path as osp

import numpy as np

from mmdrq.utils import atomic_write

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')


def write_digits(root: str) -> dict:
    """Write the PNG files and return the split sizes. A file that already
    holds exactly its bytes is kept; any other is replaced atomically (a
    killed run leaves no half file, and no temporary file that looks like
    an image). Image files the digits do not have are an error: the
    dataset would silently gain samples."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    counts = {'train': 0, 'val': 0}
    expected = set()
    for index, (image, label) in enumerate(zip(images, digits.target)):
        split = 'val' if index % 5 == 4 else 'train'
        path = osp.join(root, split, str(label), f'{index:04d}.png')
        expected.add(osp.normpath(path))
        ok, encoded = cv2.imencode('.png', image)
        if not ok:
            raise RuntimeError(f'OpenCV could not encode {path} as PNG')
        data = encoded.tobytes()
        if not osp.isfile(path) or _read(path) != data:
            atomic_write(path, lambda f: f.write(data))
        counts[split] += 1
    extra = sorted(
        path for split in counts
        for folder, _, files in os.walk(osp.join(root, split))
        for path in (osp.normpath(osp.join(folder, name)) for name in files)
        if path.lower().endswith(IMAGE_EXTENSIONS) and path not in expected)
    if extra:
        raise ValueError(
            f'{root} holds {len(extra)} image file(s) that are not the '
            f'digits, which the dataset would read as samples: '
            f'{extra[:5]}; remove them or choose another root')
    return counts


def _read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()
