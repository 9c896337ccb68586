"""Detection and segmentation datasets built from real images that
scikit-image ships (no download), for the low-bit detection and
segmentation benchmark (benchmarks/lowbit_detseg.py; CLI:
tools/make_real_datasets.py).

Sources and their labels, from classical segmentation of each image:

* ``coin``: ``skimage.data.coins()`` (303x384 grey photograph of 24 coins);
  watershed of the Sobel gradient from dark/bright markers, holes filled
  (scikit-image's gallery recipe), 24 objects.
* ``galaxy``: ``skimage.data.hubble_deep_field()`` (Hubble eXtreme Deep
  Field, 872x1000 RGB); Otsu threshold of the grey image, components of at
  least 40 pixels.
* ``nucleus`` (segmentation only, as galaxies are detection only: touching
  nuclei merge into blobs, so the components are not instances; galaxies
  are 0.5% of the pixels, which an FCN-D8 trained for minutes never
  predicts): ``skimage.data.immunohistochemistry()``
  (512x512 IHC stain); Otsu threshold of the haematoxylin channel
  (``rgb2hed``), opened, holes filled, components of at least 30 pixels.

Held-out sources (benchmarks/lowbit_heldout.py: no option or default was
chosen on them), each a set of its own (``HELD_OUT_SETS``):

* ``glyph`` (detection): ``skimage.data.page()`` (191x384 scanned book
  page), its top 140 rows (the prose); Sauvola threshold (window 25), dark
  components of at least 12 pixels: letters.
* ``brick`` (detection): ``skimage.data.brick()`` (512x512 grey brick
  wall); Otsu threshold of the blurred image (sigma 1), opened (disk 2),
  dark components of at least 150 pixels: bricks, 89 of them.
* ``vessel`` (segmentation): ``skimage.data.retina()`` (1411x1411 fundus
  photograph); Sato ridge filter (sigmas 2, 4, 6) of the green channel
  inside the eroded field of view, Otsu threshold, components of at least
  200 pixels (5% of the pixels).
* ``flower`` (segmentation): scikit-learn's ``flower.jpg`` (427x640
  dahlia); orange hue (< 0.12, saturation and value > 0.35), opened,
  closed, holes filled, components of at least 500 pixels. Transposed,
  so that the held-out third (below) holds the lower flower.

Samples are random square crops (of the images enlarged ``scale`` times)
with random flips and 90 degree turns.
Train crops come from the left two thirds of each image, val crops from the
right third, so no object pixel is in both splits.

Detection (``write_real_detection``, mmdet ``CocoDataset``):
``ROOT/{train,val}/*.png`` and ``ROOT/annotations/instances_{train,val}.json``
(classes ``DET_CLASSES``); an object is annotated in a crop when at least
half of its pixels and ``MIN_VISIBLE`` pixels are inside it, with the box
and area of its visible pixels.

Segmentation (``write_real_segmentation``, mmseg ``BaseSegDataset``):
``ROOT/img_dir/{train,val}/*.png`` and ``ROOT/ann_dir/{train,val}/*.png``
(uint8, ``SEG_CLASSES`` index per pixel, no ignored label).

Both are deterministic given the seed and written into a temporary sibling
folder that replaces ``root`` only once complete; ``root/dataset.json``
records the arguments, and a folder already holding the same arguments is
kept as is.
"""
import json
import os
import os.path as osp
from typing import Callable, Dict, Tuple

import numpy as np

from .folder import check_sizes, write_dataset_folder

DET_CLASSES = ('coin', 'galaxy')
SEG_CLASSES = ('background', 'coin', 'nucleus')
# name -> (kind, sources, writer arguments) of the held-out sets
HELD_OUT_SETS = {
    'glyph': ('detection', ('glyph',), dict(scale=3)),
    'brick': ('detection', ('brick',), dict(scale=1)),
    'vessel': ('segmentation', ('vessel',), dict(scale=1)),
    'flower': ('segmentation', ('flower',), dict(scale=1)),
}
MIN_VISIBLE = 16
# the first split's share of each image's width
TRAIN_SHARE = 2 / 3
_FORMAT_VERSION = 2


def _without_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Connected components (8-connected) of ``mask`` with at least
    ``min_size`` pixels, as int32 labels 1..n (0 is background)."""
    from skimage import measure
    labels = measure.label(mask, connectivity=2)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return measure.label(keep[labels], connectivity=2).astype(np.int32)


def _coins() -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import data, filters, segmentation
    grey = data.coins()
    markers = np.zeros_like(grey)
    markers[grey < 30] = 1
    markers[grey > 150] = 2
    coins = segmentation.watershed(filters.sobel(grey), markers) == 2
    return grey, _without_small(ndimage.binary_fill_holes(coins), 100)


def _galaxies() -> Tuple[np.ndarray, np.ndarray]:
    from skimage import color, data, filters
    rgb = data.hubble_deep_field()
    grey = color.rgb2gray(rgb)
    return rgb, _without_small(grey > filters.threshold_otsu(grey), 40)


def _nuclei() -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import color, data, filters, morphology
    rgb = data.immunohistochemistry()
    haematoxylin = color.rgb2hed(rgb)[..., 0]
    mask = haematoxylin > filters.threshold_otsu(haematoxylin)
    mask = ndimage.binary_opening(mask, structure=morphology.disk(2))
    return rgb, _without_small(ndimage.binary_fill_holes(mask), 30)


def _glyphs() -> Tuple[np.ndarray, np.ndarray]:
    from skimage import data, filters
    grey = data.page()[:140]  # the prose; below: blank, then a faint code line
    return grey, _without_small(
        grey < filters.threshold_sauvola(grey, window_size=25), 12)


def _bricks() -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import data, filters, morphology
    grey = data.brick()
    smooth = filters.gaussian(grey, 1.0)
    mask = smooth < filters.threshold_otsu(smooth)
    mask = ndimage.binary_opening(mask, structure=morphology.disk(2))
    return grey, _without_small(mask, 150)


def _vessels() -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import color, data, filters
    rgb = data.retina()
    view = ndimage.binary_erosion(color.rgb2gray(rgb) > 0.1, iterations=10)
    ridges = filters.sato(rgb[..., 1] / 255.0, sigmas=[2, 4, 6],
                          black_ridges=True) * view
    return rgb, _without_small(
        ridges > filters.threshold_otsu(ridges[view]), 200)


def _flowers() -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import color, morphology
    from sklearn.datasets import load_sample_image
    rgb = load_sample_image('flower.jpg')
    hsv = color.rgb2hsv(rgb)
    mask = (hsv[..., 0] < 0.12) & (hsv[..., 1] > 0.35) & (hsv[..., 2] > 0.35)
    mask = ndimage.binary_opening(mask, structure=morphology.disk(2))
    mask = ndimage.binary_closing(mask, structure=morphology.disk(4))
    labels = _without_small(ndimage.binary_fill_holes(mask), 500)
    return (np.ascontiguousarray(rgb.transpose(1, 0, 2)),
            np.ascontiguousarray(labels.T))


SOURCES: Dict[str, Callable[[], Tuple[np.ndarray, np.ndarray]]] = {
    'coin': _coins, 'galaxy': _galaxies, 'nucleus': _nuclei,
    'glyph': _glyphs, 'brick': _bricks, 'vessel': _vessels,
    'flower': _flowers}


def _check_sources(sources) -> tuple:
    """``sources`` as a tuple of known, distinct source names."""
    sources = tuple(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if not sources or unknown or len(set(sources)) < len(sources):
        raise ValueError(f'sources must be distinct names of {sorted(SOURCES)}'
                         f', got {sources!r}')
    return sources


def _load_source(name: str, scale: int) -> Tuple[np.ndarray, np.ndarray]:
    """(BGR uint8 image, int32 component labels) of source ``name``,
    enlarged ``scale`` times (bilinear; labels nearest)."""
    import cv2
    image, labels = SOURCES[name]()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = np.ascontiguousarray(image[..., ::-1])
    if scale != 1:
        size = (image.shape[1] * scale, image.shape[0] * scale)
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    return image, labels


def _crops(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray,
           split: str, count: int, size: int):
    """``count`` random (image, labels) crops of ``size`` from ``split``'s
    part of the image, each flipped and turned at random."""
    width = image.shape[1]
    cut = int(round(width * TRAIN_SHARE))
    x_range = (0, cut - size) if split == 'train' else (cut, width - size)
    if x_range[1] < x_range[0] or image.shape[0] < size:
        raise ValueError(f'crop size {size} does not fit the {split} part '
                         f'of a {image.shape[:2]} image')
    for _ in range(count):
        x = int(rng.integers(x_range[0], x_range[1] + 1))
        y = int(rng.integers(0, image.shape[0] - size + 1))
        crop = (image[y:y + size, x:x + size], labels[y:y + size, x:x + size])
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        crop = tuple(np.rot90(a, turns) for a in crop)
        if flip:
            crop = tuple(a[:, ::-1] for a in crop)
        yield tuple(np.ascontiguousarray(a) for a in crop)


def _write_png(path: str, array: np.ndarray):
    import cv2
    os.makedirs(osp.dirname(path), exist_ok=True)
    if not cv2.imwrite(path, array):
        raise RuntimeError(f'OpenCV could not write {path}')


def write_real_detection(root: str, num_train: int = 48, num_val: int = 16,
                         size: int = 96, seed: int = 0, scale: int = 1,
                         sources=DET_CLASSES) -> Dict[str, int]:
    """Write the COCO-format detection dataset (classes ``sources``).

    Args:
        root: dataset folder (``train/``, ``val/``, ``annotations/``).
        num_train, num_val: crops per class (source image) in each split.
        size: side of the square crops (pixels).
        seed: seed of the crops, flips and turns.
        scale: enlargement of the source images before cropping.
        sources: the source images, one class each (``SOURCES``' names).

    Returns:
        objects per split: ``{'train': n, 'val': n}``.
    """
    splits = {'train': num_train, 'val': num_val}
    check_sizes(num_train=num_train, num_val=num_val, size=size,
                 scale=scale)
    classes = _check_sources(sources)
    settings = dict(kind='detection', splits=splits, size=size, seed=seed,
                    scale=scale, sources=list(classes),
                    version=_FORMAT_VERSION)

    def build(folder):
        rng = np.random.default_rng(seed)
        images_of = {name: _load_source(name, scale) for name in classes}
        categories = [dict(id=i + 1, name=name, supercategory='object')
                      for i, name in enumerate(classes)]
        counts = {}
        for split_index, (split, count) in enumerate(splits.items()):
            images, annotations = [], []
            for class_index, name in enumerate(classes):
                image, labels = images_of[name]
                full_area = np.bincount(labels.ravel())
                for crop_index, (crop, crop_labels) in enumerate(
                        _crops(rng, image, labels, split, count, size)):
                    image_id = split_index * 100000 + len(images) + 1
                    file_name = f'{name}_{crop_index:04d}.png'
                    _write_png(osp.join(folder, split, file_name), crop)
                    images.append(dict(id=image_id, file_name=file_name,
                                       height=size, width=size))
                    for obj in np.unique(crop_labels[crop_labels > 0]):
                        ys, xs = np.nonzero(crop_labels == obj)
                        if len(xs) < max(MIN_VISIBLE, full_area[obj] / 2):
                            continue
                        x, y = int(xs.min()), int(ys.min())
                        annotations.append(dict(
                            id=split_index * 100000 + len(annotations) + 1,
                            image_id=image_id, category_id=class_index + 1,
                            bbox=[x, y, int(xs.max()) - x + 1,
                                  int(ys.max()) - y + 1],
                            area=int(len(xs)), iscrowd=0))
            path = osp.join(folder, 'annotations', f'instances_{split}.json')
            os.makedirs(osp.dirname(path), exist_ok=True)
            with open(path, 'w') as f:
                json.dump(dict(images=images, annotations=annotations,
                               categories=categories), f)
            counts[split] = len(annotations)
        return counts

    return write_dataset_folder(root, settings, build)


def write_real_segmentation(root: str, num_train: int = 32,
                            num_val: int = 16, size: int = 64,
                            seed: int = 0, scale: int = 2,
                            sources=SEG_CLASSES[1:]) -> Dict[str, int]:
    """Write the mmseg-layout semantic segmentation dataset (classes
    ``('background',) + sources``; label 0 is the background of every
    source).

    Args:
        root: dataset folder (``img_dir/``, ``ann_dir/``).
        num_train, num_val: crops per source image in each split.
        size: side of the square crops (pixels).
        seed: seed of the crops, flips and turns.
        scale: enlargement of the source images before cropping (the
            default 2 keeps galaxies and nuclei above FCN-D8's stride).

    Returns:
        images per split: ``{'train': n, 'val': n}``.
    """
    splits = {'train': num_train, 'val': num_val}
    check_sizes(num_train=num_train, num_val=num_val, size=size,
                 scale=scale)
    names = _check_sources(sources)
    settings = dict(kind='segmentation', splits=splits, size=size,
                    seed=seed, scale=scale, sources=list(names),
                    version=_FORMAT_VERSION)

    def build(folder):
        rng = np.random.default_rng(seed)
        counts = {}
        for class_index, name in enumerate(names, start=1):
            image, labels = _load_source(name, scale)
            classes = (labels > 0).astype(np.uint8) * class_index
            for split, count in splits.items():
                for index, (crop, crop_classes) in enumerate(
                        _crops(rng, image, classes, split, count, size)):
                    stem = f'{name}_{index:04d}.png'
                    _write_png(osp.join(folder, 'img_dir', split, stem), crop)
                    _write_png(osp.join(folder, 'ann_dir', split, stem),
                               crop_classes)
                    counts[split] = counts.get(split, 0) + 1
        return counts

    return write_dataset_folder(root, settings, build)
