"""Instance masks pasted into the original image, in numpy: what mmdet's
``FCNMaskHead`` does on the CPU after the graph (its ``_do_paste_mask``
with ``skip_empty``: each mask bilinearly sampled, ``grid_sample`` with
``align_corners=False`` and zero padding, over its box and a pixel around
it, then thresholded). A graph cannot do it: its output size is the
original image's, and whole-image grids of every detection are too large.
"""
import numpy as np


def paste_masks(masks: np.ndarray, boxes: np.ndarray, height: int,
                width: int, threshold: float) -> np.ndarray:
    """(K, height, width) bool masks from (K, M, M) mask probabilities and
    their (K, 4) boxes (x1, y1, x2, y2) in the image's pixels."""
    out = np.zeros((len(masks), height, width), bool)
    for mask, box, canvas in zip(masks.astype(np.float32),
                                 boxes.astype(np.float32), out):
        x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in box[:2])
        x1 = min(int(np.ceil(box[2])) + 1, width)
        y1 = min(int(np.ceil(box[3])) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        sampled = _bilinear(mask, _grid(x0, x1, box[0], box[2]),
                            _grid(y0, y1, box[1], box[3]))
        canvas[y0:y1, x0:x1] = sampled >= threshold
    return out


def _grid(start: int, stop: int, low, high) -> np.ndarray:
    """Pixel centers start..stop-1 in the box's [-1, 1] coordinates
    (float32, as mmdet computes them). A zero-size box divides by 0: mmdet
    sets the infinite ones to 0, and a 0 / 0 (the box on a pixel center)
    samples nothing in torch's ``grid_sample``: here a point outside."""
    with np.errstate(divide='ignore', invalid='ignore'):
        grid = (np.arange(start, stop, dtype=np.float32) + np.float32(0.5) -
                low) / (high - low) * np.float32(2) - np.float32(1)
    grid[np.isinf(grid)] = 0
    grid[np.isnan(grid)] = -3
    return grid


def _bilinear(mask: np.ndarray, gx: np.ndarray, gy: np.ndarray):
    """``grid_sample(mask, grid, align_corners=False)`` on the separable
    grid (gy rows, gx columns), zeros outside the mask."""
    padded = np.pad(mask, 1)  # the zero border: taps outside read it
    taps = []
    for g, size in ((gy, mask.shape[0]), (gx, mask.shape[1])):
        source = ((g + np.float32(1)) * np.float32(size) - np.float32(1)) / \
            np.float32(2)
        low = np.floor(source)
        index = np.clip(low, -1, size).astype(np.int64) + 1, \
            np.clip(low + 1, -1, size).astype(np.int64) + 1
        taps.append((index, (low + np.float32(1) - source, source - low)))
    (rows, (top, bottom)), (cols, (left, right)) = taps
    value = 0
    for row, wy in zip(rows, (top, bottom)):
        for col, wx in zip(cols, (left, right)):
            value = value + padded[row][:, col] * (wy[:, None] * wx[None, :])
    return value
