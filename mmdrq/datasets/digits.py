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
    holds exactly its bytes is kept; a missing one is written atomically (a
    killed run leaves no half file, and no temporary file that looks like
    an image). Image files the digits do not have, and files with other
    bytes where a digit goes, are an error before anything is written: the
    dataset would silently gain samples, or a user's file would be lost."""
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    files, counts = {}, {'train': 0, 'val': 0}
    for index, (image, label) in enumerate(zip(images, digits.target)):
        split = 'val' if index % 5 == 4 else 'train'
        path = osp.normpath(osp.join(root, split, str(label),
                                     f'{index:04d}.png'))
        ok, encoded = cv2.imencode('.png', image)
        if not ok:
            raise RuntimeError(f'OpenCV could not encode {path} as PNG')
        files[path] = image, encoded.tobytes()
        counts[split] += 1
    # every check before anything is written
    extra = sorted(
        path for split in counts
        for folder, _, names in os.walk(osp.join(root, split))
        for path in (osp.normpath(osp.join(folder, name)) for name in names)
        if path.lower().endswith(IMAGE_EXTENSIONS) and path not in files)
    if extra:
        raise ValueError(
            f'{root} holds {len(extra)} image file(s) that are not the '
            f'digits, which the dataset would read as samples: '
            f'{extra[:5]}; remove them or choose another root (nothing was '
            'written)')
    # another PNG encoder's bytes of the same pixels are still the digit
    changed = [path for path, (image, data) in files.items()
               if osp.isfile(path) and _read(path) != data and
               not np.array_equal(cv2.imread(path, cv2.IMREAD_UNCHANGED),
                                  image)]
    if changed:
        raise FileExistsError(
            f'{root} holds {len(changed)} file(s) where the digits go, with '
            f'other contents (yours?): {changed[:3]}; choose another root '
            '(nothing was written)')
    for path, (_, data) in files.items():
        if not osp.isfile(path):
            atomic_write(path, lambda f, data=data: f.write(data))
    return counts


def _read(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()
