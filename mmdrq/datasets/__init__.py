"""Writers of the small real and synthetic datasets the examples, tests
and benchmarks run on (the tools prepare_digits / make_tiny_datasets are
their command lines)."""
from .digits import write_digits
from .real_images import (DET_CLASSES, HELD_OUT_SETS, SEG_CLASSES,
                          write_real_detection,
                          write_real_segmentation)
from .tiny_shapes import (ADE20K_CLASSES, COCO_CLASSES, write_tiny_ade20k,
                          write_tiny_coco)

__all__ = ['ADE20K_CLASSES', 'COCO_CLASSES', 'DET_CLASSES', 'HELD_OUT_SETS',
           'SEG_CLASSES',
           'write_digits', 'write_real_detection', 'write_real_segmentation',
           'write_tiny_ade20k', 'write_tiny_coco']
