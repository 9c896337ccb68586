"""mmdrq_runtime's numpy mask paste against mmdet's own (``FCNMaskHead``'s
CPU path, ``_do_paste_mask`` with ``skip_empty``) on fresh random masks and
boxes: boxes on pixel edges and centers and on the image's border (detectors
clip their boxes to it), sub-pixel and zero-size boxes, and masks at the
threshold."""
import numpy as np
import torch
from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask

from mmdrq_runtime.masks import paste_masks


def mmdet_paste(masks, boxes, height, width):
    """mmdet's pasted mask values (before its threshold)."""
    out = np.zeros((len(masks), height, width), np.float32)
    for i in range(len(masks)):
        pasted, region = _do_paste_mask(
            torch.from_numpy(masks[i:i + 1, None]),
            torch.from_numpy(boxes[i:i + 1]), height, width, skip_empty=True)
        out[i][region] = pasted[0].numpy()
    return out


def test_paste_equals_mmdet_pixel_for_pixel():
    rng = np.random.default_rng()
    count, height, width = 300, 70, 110
    masks = rng.random((count, 28, 28), dtype=np.float32)
    masks[:20] = 0.5  # every sample at the threshold
    corner = rng.random((count, 2)) * [width, height]
    boxes = np.concatenate([corner, corner + rng.random((count, 2)) * 70],
                           1).clip(0, [width, height] * 2).astype(np.float32)
    boxes[20:60] = np.round(boxes[20:60])  # on pixel edges
    boxes[60:100] = np.round(boxes[60:100]) + 0.5  # on pixel centers
    boxes[100:110, 2:] = boxes[100:110, :2] + 0.3  # under a pixel
    boxes[110:115, 2] = boxes[110:115, 0]  # zero width
    boxes[115:120, [0, 2]] = np.floor(boxes[115:120, [0]]) + 0.5  # and on
    # a pixel center: 0 / 0 there
    got = paste_masks(masks, boxes, height, width, 0.5)
    values = mmdet_paste(masks, boxes, height, width)
    want = values >= 0.5
    assert want[20:].any() and (~want[20:]).any()
    # equal but where mmdet's value is within float rounding of the
    # threshold (torch's grid_sample sums its four taps in its own order)
    differ = got != want
    assert (np.abs(values[differ] - 0.5) <= 1e-6).all(), values[differ]
    assert differ.sum() <= 1e-4 * differ.size
