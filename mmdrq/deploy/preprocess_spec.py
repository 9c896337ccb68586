"""The config's test-time preprocessing as plain data for ``meta.json``, so
that ``mmdrq_runtime.Inferencer`` repeats it on a deploy host without the
OpenMMLab packages: the test pipeline's resizes, then the data
preprocessor's channel order, normalization and padding."""
from typing import Optional, Tuple

# transforms that load, annotate or pack: nothing to repeat on an image
_PASSIVE = ('LoadImageFromFile', 'LoadAnnotations', 'PackInputs',
            'PackDetInputs', 'PackSegInputs', 'PackClsInputs')


def _pair(value):
    return [int(value), int(value)] if isinstance(value, (int, float)) \
        else [int(v) for v in value]


def preprocess_spec(cfg, model) -> Tuple[Optional[dict], Optional[str]]:
    """(spec, None), or (None, why the image-in API cannot repeat it)."""
    steps = []
    for transform in cfg.test_dataloader.dataset.get('pipeline', []):
        kind = str(transform['type']).split('.')[-1]
        if kind in _PASSIVE:
            continue
        if kind == 'Resize' and transform.get('scale') is not None and \
                transform.get('scale_factor') is None:
            steps.append(dict(type='resize', scale=_pair(transform['scale']),
                              keep_ratio=bool(transform.get('keep_ratio',
                                                            False))))
        elif kind == 'ResizeEdge':
            steps.append(dict(type='resize_edge', scale=int(
                transform['scale']), edge=transform.get('edge', 'short')))
        else:
            return None, (f'the test pipeline\'s {kind} has no torch-free '
                          'form (Resize, ResizeEdge have)')
        interpolation = transform.get('interpolation', 'bilinear')
        if interpolation != 'bilinear' or \
                transform.get('backend', 'cv2') != 'cv2':
            return None, (f'{kind} with interpolation={interpolation!r}: '
                          "only OpenCV's bilinear is repeated")
    pre = model.data_preprocessor
    conversion = [getattr(pre, key) for key in
                  ('_channel_conversion', 'channel_conversion', 'to_rgb')
                  if hasattr(pre, key)]
    normalize = bool(getattr(pre, '_enable_normalize', False))
    test_cfg = getattr(pre, 'test_cfg', None) or {}  # mmseg's test padding
    size = test_cfg.get('size')
    spec = dict(
        steps=steps, to_rgb=bool(conversion and conversion[0]),
        mean=pre.mean.flatten().tolist() if normalize else None,
        std=pre.std.flatten().tolist() if normalize else None,
        pad_divisor=int(test_cfg.get('size_divisor') or
                        getattr(pre, 'pad_size_divisor', 1) or 1),
        pad_size=_pair(size) if size else None,
        pad_value=float(getattr(pre, 'pad_value', getattr(pre, 'pad_val',
                                                          0))))
    return spec, None
