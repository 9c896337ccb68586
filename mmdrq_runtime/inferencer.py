"""Images in, predictions out, on a deploy host: the config's test-time
preprocessing (recorded in ``meta.json`` at export) with OpenCV and numpy,
then the folder's whole-pipeline graph at the chosen bit."""
from typing import Optional, Union

import numpy as np

from .masks import paste_masks
from .session import SwitchableSession


def _resize(image: np.ndarray, size) -> np.ndarray:
    import cv2
    return cv2.resize(image, (int(size[0]), int(size[1])),
                      interpolation=cv2.INTER_LINEAR)


def _scaled(w: int, h: int, factor: float):
    """OpenMMLab's rounding of a rescaled size (mmcv ``_scale_size``)."""
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def apply_steps(image: np.ndarray, steps) -> np.ndarray:
    """The test pipeline's resizes, as mmcv's ``Resize`` (``keep_ratio``:
    ``imrescale``) and mmpretrain's ``ResizeEdge`` compute them."""
    for step in steps:
        h, w = image.shape[:2]
        if step['type'] == 'resize' and step['keep_ratio']:
            long_edge, short_edge = max(step['scale']), min(step['scale'])
            factor = min(long_edge / max(h, w), short_edge / min(h, w))
            image = _resize(image, _scaled(w, h, factor))
        elif step['type'] == 'resize':
            image = _resize(image, step['scale'])
        elif step['type'] == 'resize_edge':
            edge, scale = step['edge'], step['scale']
            if (edge == 'short' and w < h) or (edge == 'long' and w > h) or \
                    edge == 'width':
                image = _resize(image, (scale, int(scale * h / w)))
            else:
                image = _resize(image, (int(scale * w / h), scale))
        else:
            raise ValueError(f'unknown preprocessing step {step["type"]!r}')
    return image


def to_input(image: np.ndarray, spec: dict):
    """(1, C, H, W) float32 input and (height, width) before padding, as
    the model's data preprocessor makes it: channels swapped, normalized,
    padded at the bottom and right."""
    x = image.astype(np.float32)
    if spec['to_rgb']:
        x = x[..., ::-1]
    if spec['mean'] is not None:
        x = (x - np.float32(spec['mean'])) / np.float32(spec['std'])
    x = np.ascontiguousarray(x.transpose(2, 0, 1))[None]
    h, w = x.shape[2:]
    if spec['pad_size'] is not None:
        target = list(spec['pad_size'])
    else:
        divisor = spec['pad_divisor']
        target = [-(-h // divisor) * divisor, -(-w // divisor) * divisor]
    if target != [h, w]:
        x = np.pad(x, ((0, 0), (0, 0), (0, target[0] - h),
                       (0, target[1] - w)), constant_values=spec['pad_value'])
    return x.astype(np.float32), (h, w)


def detections(session: SwitchableSession, x: np.ndarray, size, scale,
               original_size) -> dict:
    """One image's kept ``boxes``, ``scores`` and ``labels`` from a
    detection graph, and ``masks`` (bool, the original size) where it has
    them; ``size`` is the resized image's (height, width), ``scale`` the
    resize's (w, h) factors."""
    outputs = session.run(
        x, image_size=np.array(size[:2], np.float32),
        inverse_scale=np.array([1 / s for s in scale], np.float32))
    keep = outputs[1][0] >= 0
    found = dict(zip(('boxes', 'scores', 'labels', 'masks'),
                     (o[0][keep] for o in outputs)))
    if 'masks' in found:
        found['masks'] = paste_masks(
            found['masks'], found['boxes'], *original_size[:2],
            session.meta['pipeline']['mask_threshold'])
    return found


class Inferencer:
    """``Inferencer(folder).set_bits(4)(image)``: the prediction of one
    image at a bit (or SubNet) of an export folder with a whole-pipeline
    graph (``tools/export_onnx.py --graph pipeline``, the default where the
    task has one).

    Images are HxWx3 uint8 arrays in OpenCV's BGR order (as OpenMMLab
    pipelines load them) or file paths. Returns for a classifier
    ``{'scores': (classes,), 'label': int}``; for a detector ``{'boxes':
    (K, 4), 'scores': (K,), 'labels': (K,)}``, boxes (x1, y1, x2, y2) in
    the image's own pixels (Mask R-CNN adds ``'masks'``: (K, H, W) bool);
    for a segmentor ``{'labels': (H, W)}`` at the
    image's own size.
    """

    def __init__(self, folder: str, threads: Optional[int] = None,
                 kernels: str = 'exact'):
        self.session = SwitchableSession(folder, threads, kernels)
        meta = self.session.meta
        if not meta.get('pipeline'):
            raise ValueError(f'{folder!r} holds head tensors, not a whole-'
                             'pipeline graph: export with --graph pipeline')
        if meta.get('preprocess') is None:
            raise ValueError(f'{folder!r}: no image-in preprocessing: '
                             f'{meta.get("preprocess_refusal")}')
        self.task = meta['pipeline']['task']
        self.spec = meta['preprocess']

    def set_bits(self, bits: Union[int, str]) -> 'Inferencer':
        self.session.set_bits(bits)
        return self

    def __call__(self, image: Union[str, np.ndarray]) -> dict:
        if isinstance(image, str):
            import cv2
            path, image = image, cv2.imread(image, cv2.IMREAD_COLOR)
            if image is None:
                raise FileNotFoundError(f'cannot read an image from {path!r}')
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError('an image is an HxWx3 uint8 array (BGR), got '
                             f'{image.dtype} {image.shape}')
        resized = apply_steps(image, self.spec['steps'])
        x, (h, w) = to_input(resized, self.spec)
        if self.task == 'detection':  # mmcv's scale: new size / old size
            scale = (resized.shape[1] / image.shape[1],
                     resized.shape[0] / image.shape[0])
            return detections(self.session, x, (h, w), scale,
                              image.shape[:2])
        if self.task == 'classification':
            scores, labels = self.session.run(x)
            return dict(scores=scores[0], label=int(labels[0]))
        padded = x.shape[2:]
        crop = np.array([0, padded[0] - h, 0, padded[1] - w], np.int64)
        labels = self.session.run(x, crop=crop, output_size=np.array(
            image.shape[:2], np.int64))[0]
        return dict(labels=labels[0])
