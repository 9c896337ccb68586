"""Write tiny synthetic detection and segmentation datasets for the
end-to-end tests of the detection and segmentation configs: real JPEG
images of filled shapes in distinct colours on a noisy background, in the
layouts mmdet's ``CocoDataset`` and mmseg's ``ADE20KDataset`` read.

CLI: tools/make_tiny_datasets.py.

COCO (``write_tiny_coco``): ``ROOT/{train,val}/*.jpg`` and
``ROOT/annotations/instances_{train,val}.json`` with a bbox, area (pixels of
the object's mask), ``iscrowd=0`` and a polygon ``segmentation`` per object,
categories ``rectangle`` (1), ``ellipse`` (2), ``triangle`` (3). Objects do
not overlap, so every mask is exactly the drawn polygon.

ADE20K (``write_tiny_ade20k``): ``ROOT/images/{training,validation}/*.jpg``
and ``ROOT/annotations/{training,validation}/*.png`` (uint8 labels). As in
ADE20K, 0 is "other" and ignored (``reduce_zero_label=True`` maps it to 255):
here a 2-pixel frame around the image; 1 is the background, 2 rectangles,
3 ellipses. After reducing the zero label these are classes 0..2, which are
ADE20K's first three class names (``wall``, ``building``, ``sky``, see
``ADE20K_CLASSES``).

Everything is deterministic given the seed; each dataset is written into a
temporary folder that replaces ``root`` once complete, and only a new or
empty ``root`` or one these writers made is replaced (``folder.py``).
"""
import json
import os
import os.path as osp
from typing import Dict, List, Tuple

import numpy as np

from .folder import check_sizes, write_dataset_folder

COCO_CATEGORIES = [
    dict(id=1, name='rectangle', supercategory='shape'),
    dict(id=2, name='ellipse', supercategory='shape'),
    dict(id=3, name='triangle', supercategory='shape'),
]
COCO_CLASSES = tuple(c['name'] for c in COCO_CATEGORIES)
# the first three classes of ADE20K (after reduce_zero_label): the label
# values 1, 2, 3 in the PNGs
ADE20K_CLASSES = ('wall', 'building', 'sky')

# BGR colours, far apart so shapes are easy to tell from each other and
# from the background
_COLOURS = {
    'rectangle': (40, 40, 220),
    'ellipse': (220, 60, 40),
    'triangle': (40, 200, 60),
}


def _write_bytes(path: str, data: bytes):
    """A plain write: the whole dataset folder is swapped in once
    complete (folder.py), so no single file needs to be atomic."""
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _write_image(path: str, image: np.ndarray, ext: str):
    import cv2
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == '.jpg' else []
    ok, encoded = cv2.imencode(ext, image, params)
    if not ok:
        raise RuntimeError(f'could not encode {path}')
    _write_bytes(path, encoded.tobytes())


def _write_json(path: str, content: dict):
    _write_bytes(path, json.dumps(content).encode('utf-8'))


def _background(rng: np.random.Generator, height: int,
                width: int) -> np.ndarray:
    """A grey-ish noisy background (BGR uint8)."""
    base = rng.integers(90, 160, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, kind: str, box) -> np.ndarray:
    """Integer polygon (N x 2, x/y) of a ``kind`` shape inside ``box``
    (x0, y0, x1, y1, inclusive)."""
    import cv2
    x0, y0, x1, y1 = box
    if kind == 'rectangle':
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                        dtype=np.int32)
    if kind == 'ellipse':
        center = ((x0 + x1) // 2, (y0 + y1) // 2)
        axes = ((x1 - x0) // 2, (y1 - y0) // 2)
        return cv2.ellipse2Poly(center, axes, 0, 0, 360, 15).astype(np.int32)
    if kind == 'triangle':
        apex = int(rng.integers(x0, x1 + 1))
        return np.array([[apex, y0], [x1, y1], [x0, y1]], dtype=np.int32)
    raise ValueError(f'unknown shape {kind!r}')


def _place_boxes(rng: np.random.Generator, height: int, width: int,
                 count: int, min_size: int, max_size: int,
                 margin: int = 2) -> List[Tuple[int, int, int, int]]:
    """Up to ``count`` boxes (x0, y0, x1, y1) inside the image that do not
    overlap (with ``margin`` pixels between them)."""
    boxes = []
    for _ in range(count * 50):
        if len(boxes) == count:
            break
        w = int(rng.integers(min_size, max_size + 1))
        h = int(rng.integers(min_size, max_size + 1))
        x0 = int(rng.integers(margin, width - w - margin))
        y0 = int(rng.integers(margin, height - h - margin))
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        if all(box[0] > b[2] + margin or box[2] < b[0] - margin or
               box[1] > b[3] + margin or box[3] < b[1] - margin
               for b in boxes):
            boxes.append(box)
    return boxes


def _coco_split(rng, root, split, num_images, size, first_image_id,
                first_ann_id) -> dict:
    import cv2
    height, width = size
    images, annotations = [], []
    ann_id = first_ann_id
    kinds = [c['name'] for c in COCO_CATEGORIES]
    for index in range(num_images):
        image_id = first_image_id + index
        file_name = f'{split}_{index:04d}.jpg'
        image = _background(rng, height, width)
        count = int(rng.integers(2, 5))
        short = min(height, width)
        boxes = _place_boxes(rng, height, width, count, short // 6,
                             short // 2)
        for box_index, box in enumerate(boxes):
            # cycle the categories so every split has all of them
            kind = kinds[(index + box_index) % len(kinds)]
            polygon = _shape_polygon(rng, kind, box)
            mask = np.zeros((height, width), np.uint8)
            cv2.fillPoly(mask, [polygon], 1)
            cv2.fillPoly(image, [polygon], _COLOURS[kind])
            ys, xs = np.nonzero(mask)
            x, y = int(xs.min()), int(ys.min())
            w, h = int(xs.max()) - x + 1, int(ys.max()) - y + 1
            annotations.append(dict(
                id=ann_id, image_id=image_id,
                category_id=kinds.index(kind) + 1,
                bbox=[x, y, w, h], area=int(mask.sum()), iscrowd=0,
                segmentation=[[float(v) for v in polygon.reshape(-1)]]))
            ann_id += 1
        _write_image(osp.join(root, split, file_name), image, '.jpg')
        images.append(dict(id=image_id, file_name=file_name, height=height,
                           width=width))
    content = dict(images=images, annotations=annotations,
                   categories=COCO_CATEGORIES)
    _write_json(osp.join(root, 'annotations', f'instances_{split}.json'),
                content)
    return content


def write_tiny_coco(root: str, num_images: int = 8,
                    size: Tuple[int, int] = (96, 128),
                    seed: int = 0) -> Dict[str, int]:
    """Write a tiny COCO-format detection / instance dataset under ``root``
    (a new or empty folder, or one these writers made: ``folder.py``).

    Args:
        root: the dataset folder (``train/``, ``val/``, ``annotations/``).
        num_images: images in each split.
        size: (height, width) of every image.
        seed: seed of all random choices.

    Returns:
        ``{'train': n_objects, 'val': n_objects}``.
    """
    check_sizes(num_images=num_images)
    size = tuple(size)

    def build(folder):
        rng = np.random.default_rng(seed)
        counts = {}
        for split_index, split in enumerate(('train', 'val')):
            content = _coco_split(rng, folder, split, num_images, size,
                                  first_image_id=split_index * 100000 + 1,
                                  first_ann_id=split_index * 100000 + 1)
            counts[split] = len(content['annotations'])
        return counts

    return write_dataset_folder(root, dict(
        kind='tiny_coco', num_images=num_images, size=list(size), seed=seed),
        build)


def write_tiny_ade20k(root: str, num_images: int = 8,
                      size: Tuple[int, int] = (64, 64),
                      seed: int = 0) -> Dict[str, int]:
    """Write a tiny ADE20K-layout semantic segmentation dataset (a new or
    empty ``root``, or one these writers made: ``folder.py``).

    Label PNGs: 0 = ignored frame, 1 = background, 2 = rectangles,
    3 = ellipses (``ADE20K_CLASSES`` after ``reduce_zero_label``).

    Args:
        root: the dataset folder (``images/``, ``annotations/``).
        num_images: images in each split.
        size: (height, width) of every image.
        seed: seed of all random choices.

    Returns:
        ``{'training': n_images, 'validation': n_images}``.
    """
    check_sizes(num_images=num_images)
    size = tuple(size)

    def build(folder):
        import cv2
        rng = np.random.default_rng(seed + 1)
        height, width = size
        counts = {}
        for split in ('training', 'validation'):
            for index in range(num_images):
                name = f'ADE_{split[:5]}_{index:08d}'
                image = _background(rng, height, width)
                label = np.ones((height, width), np.uint8)
                short = min(height, width)
                boxes = _place_boxes(rng, height, width,
                                     int(rng.integers(2, 4)), short // 5,
                                     short // 2, margin=3)
                for box_index, box in enumerate(boxes):
                    kind = ('rectangle', 'ellipse')[(index + box_index) % 2]
                    polygon = _shape_polygon(rng, kind, box)
                    cv2.fillPoly(image, [polygon], _COLOURS[kind])
                    cv2.fillPoly(label, [polygon],
                                 2 if kind == 'rectangle' else 3)
                label[:2, :] = label[-2:, :] = 0
                label[:, :2] = label[:, -2:] = 0
                _write_image(osp.join(folder, 'images', split,
                                      name + '.jpg'), image, '.jpg')
                _write_image(osp.join(folder, 'annotations', split,
                                      name + '.png'), label, '.png')
            counts[split] = num_images
        return counts

    return write_dataset_folder(root, dict(
        kind='tiny_ade20k', num_images=num_images, size=list(size),
        seed=seed), build)
