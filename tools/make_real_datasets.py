"""Write the real-image detection (COCO) and segmentation (mmseg layout)
datasets of the low-bit benchmark from images scikit-image ships; see
mmdrq/datasets/real_images.py.

    python tools/make_real_datasets.py [--det-root data/real_det]
        [--seg-root data/real_seg] [--seed 0]
"""
import argparse

from mmdrq.datasets import write_real_detection, write_real_segmentation
from mmdrq.datasets.folder import check_distinct_roots, check_replaceable


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--det-root', default='data/real_det')
    parser.add_argument('--seg-root', default='data/real_seg')
    parser.add_argument('--det-crops', type=int, nargs=2, default=(48, 16),
                        metavar=('TRAIN', 'VAL'),
                        help='detection crops per class in each split')
    parser.add_argument('--seg-crops', type=int, nargs=2, default=(32, 16),
                        metavar=('TRAIN', 'VAL'),
                        help='segmentation crops per source in each split')
    parser.add_argument('--det-size', type=int, default=96,
                        help='side of the detection crops')
    parser.add_argument('--seg-size', type=int, default=64,
                        help='side of the segmentation crops')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    # every check before anything is written
    check_distinct_roots(**{'--det-root': args.det_root,
                            '--seg-root': args.seg_root})
    check_replaceable(args.det_root, 'detection')
    check_replaceable(args.seg_root, 'segmentation')
    counts = write_real_detection(args.det_root, *args.det_crops,
                                  size=args.det_size, seed=args.seed)
    print(f'detection dataset in {args.det_root}: objects {counts}')
    counts = write_real_segmentation(args.seg_root, *args.seg_crops,
                                     size=args.seg_size, seed=args.seed)
    print(f'segmentation dataset in {args.seg_root}: images {counts}')


if __name__ == '__main__':
    main()
