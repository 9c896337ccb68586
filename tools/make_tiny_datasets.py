"""Write tiny synthetic detection and segmentation datasets (COCO and ADE20K
layouts) for the end-to-end tests of the detection and segmentation configs;
see mmdrq/datasets/tiny_shapes.py.

    python tools/make_tiny_datasets.py [--coco-root data/tiny_coco]
        [--ade20k-root data/tiny_ade20k] [--num-images 8] [--seed 0]
"""
import argparse

from mmdrq.datasets import write_tiny_ade20k, write_tiny_coco
from mmdrq.datasets.folder import (check_distinct_roots, check_replaceable,
                                   check_sizes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--coco-root', default='data/tiny_coco')
    parser.add_argument('--ade20k-root', default='data/tiny_ade20k')
    parser.add_argument('--num-images', type=int, default=8,
                        help='images per split')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    # every check before anything is written
    check_sizes(**{'--num-images': args.num_images})
    check_distinct_roots(**{'--coco-root': args.coco_root,
                            '--ade20k-root': args.ade20k_root})
    check_replaceable(args.coco_root, 'tiny_coco')
    check_replaceable(args.ade20k_root, 'tiny_ade20k')
    counts = write_tiny_coco(args.coco_root, args.num_images, seed=args.seed)
    print(f'tiny COCO written to {args.coco_root}: objects {counts}')
    counts = write_tiny_ade20k(args.ade20k_root, args.num_images,
                               seed=args.seed)
    print(f'tiny ADE20K written to {args.ade20k_root}: images {counts}')


if __name__ == '__main__':
    main()
