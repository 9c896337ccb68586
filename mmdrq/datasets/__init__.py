"""Writers of the small real and synthetic datasets the examples, tests
and benchmarks run on (the tools prepare_digits / make_tiny_datasets are
their command lines)."""
from .digits import write_digits
from .tiny_shapes import (ADE20K_CLASSES, COCO_CLASSES, write_tiny_ade20k,
                          write_tiny_coco)

__all__ = ['ADE20K_CLASSES', 'COCO_CLASSES', 'write_digits',
           'write_tiny_ade20k', 'write_tiny_coco']
