"""Write the real-image detection (COCO) and segmentation (mmseg layout)
datasets of the low-bit benchmark from images scikit-image ships; see
mmdrq/datasets/real_images.py.

    python tools/make_real_datasets.py [--det-root data/real_det]
        [--seg-root data/real_seg] [--seed 0]
"""
import argparse
import os
import os.path as osp

from mmdrq.datasets import write_real_detection, write_real_segmentation
from mmdrq.datasets.real_images import check_replaceable


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
    det, seg = (osp.abspath(r) for r in (args.det_root, args.seg_root))
    if det == seg or det.startswith(seg + os.sep) or \
            seg.startswith(det + os.sep):
        parser.error(f'--det-root {args.det_root!r} and --seg-root '
                     f'{args.seg_root!r} must be separate folders')
    check_replaceable(det, 'detection')  # both, before anything is written
    check_replaceable(seg, 'segmentation')
    counts = write_real_detection(args.det_root, *args.det_crops,
                                  size=args.det_size, seed=args.seed)
    print(f'detection dataset in {args.det_root}: objects {counts}')
    counts = write_real_segmentation(args.seg_root, *args.seg_crops,
                                     size=args.seg_size, seed=args.seed)
    print(f'segmentation dataset in {args.seg_root}: images {counts}')


if __name__ == '__main__':
    main()
