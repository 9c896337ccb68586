"""The built-in example, end to end on a CPU: scikit-learn's digits written
as an mmpretrain dataset, FP32 training, one-shot {8,6,4,2} Double Rounding
QAT from the FP32 checkpoint, then the per-bit test table, the integer
export and the ONNX export of every bit, tested in ONNX Runtime. Every step
is the ordinary tool a user runs (tools/train.py, tools/test.py,
tools/export_int.py, tools/export_onnx.py).

    python tools/digits_example.py [--work-dir work_dirs/digits] [--seed 0]
        [--threads N]

The numbers are bit-identical for the same seed and thread count on the
same machine and software: every step runs with the thread count printed
with the results (sums split over other thread counts round differently,
and training carries such differences on).
"""
import argparse
import json
import os
import os.path as osp

from mmdrq.datasets import write_digits
from mmdrq.quantization.bitwidths import bit_name, bit_tag
from mmdrq.tools_common import positive_int
from mmdrq.utils.tool_runs import data_options, run_tool, train_and_test

HERE = osp.dirname(osp.abspath(__file__))
CONFIGS = osp.join(HERE, '..', 'configs', 'classification', 'digits')
FP32_CONFIG = osp.join(CONFIGS, 'resnet_digits_fp32.py')
QAT_CONFIG = osp.join(CONFIGS, 'resnet_digits_drq_8642.py')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/digits')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=positive_int, default=30)
    parser.add_argument('--qat-epochs', type=positive_int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=positive_int,
                        help="intra-op threads of every step (default: "
                        "torch's, i.e. OMP_NUM_THREADS or the cores)")
    args = parser.parse_args()
    work = osp.abspath(args.work_dir)
    root = osp.abspath(args.data_root)
    if args.threads is None:
        import torch
        args.threads = torch.get_num_threads()
    os.environ['OMP_NUM_THREADS'] = str(args.threads)  # the tools inherit it

    print(f'[1/5] digits dataset in {root}: {write_digits(root)}', flush=True)
    fp, fp_ckpt, t = train_and_test(HERE, FP32_CONFIG, osp.join(work, 'fp32'),
                                    root, args.fp32_epochs, args.seed)
    print(f'[2/5] FP32 training: {t:.0f} s', flush=True)
    qat, qat_ckpt, t = train_and_test(
        HERE, QAT_CONFIG, osp.join(work, 'drq_8642'), root, args.qat_epochs,
        args.seed, [f'load_from={fp_ckpt}'])
    print(f'[3/5] one-shot {{8,6,4,2}} QAT: {t:.0f} s', flush=True)
    int_path = osp.join(work, 'digits_int8.pth')
    run_tool([osp.join(HERE, 'export_int.py'), QAT_CONFIG, qat_ckpt,
              int_path], osp.join(work, 'export.log'))

    fp_top1 = fp['accuracy/top1']
    threads = f'{args.threads} thread' + ('s' if args.threads > 1 else '')
    print(f'[4/5] test accuracy (top-1, %) per bit-width (seed {args.seed}, '
          f'{threads})\n')
    print('| model | top-1 | vs FP32 |\n|---|---|---|')
    print(f'| FP32 | {fp_top1:.2f} | |')
    for bit in (8, 6, 4, 2):
        top1 = qat['accuracy/top1' + bit_tag(bit)]
        print(f'| {bit_name(bit)} | {top1:.2f} | {top1 - fp_top1:+.2f} |')
    print(f'\ninteger checkpoint: {int_path} '
          f'({osp.getsize(int_path):,} bytes); logs in {work}')
    ort = export_and_test_onnx(int_path, work, root, qat_ckpt)
    print('\n[5/5] ONNX Runtime on the export folder (one graph for every '
          'bit, from the integer checkpoint) beside PyTorch (its training '
          'forward, and its '
          '--numerics deploy, which ONNX Runtime\'s exact kernels equal): '
          'top-1, %\n')
    print('| bit | PyTorch | PyTorch deploy numerics | ONNX Runtime | '
          'ORT integer kernels |\n|---|---|---|---|---|')
    for bit in (8, 6, 4, 2):
        key = 'accuracy/top1' + bit_tag(bit)
        print(f'| {bit_name(bit)} | {qat[key]:.2f} | {ort["deploy"][key]:.2f} '
              f'| {ort["exact"][key]:.2f} | {ort["integer"][key]:.2f} |')


def export_and_test_onnx(int_path, work, root, qat_ckpt) -> dict:
    """Export every bit to ONNX from the integer file (one folder, replacing
    an earlier run's), then test each bit in ONNX Runtime with its exact kernels (equal to PyTorch's deploy
    numerics, also tested) and with its integer kernels; returns the
    metrics of the three."""
    onnx_dir = osp.join(work, 'onnx')
    run_tool([osp.join(HERE, 'export_onnx.py'), QAT_CONFIG, int_path,
              '--out-dir', onnx_dir, '--input-shape', 1, 3, 16, 16,
              '--overwrite'],
             osp.join(work, 'export_onnx.log'))
    runs = {kernels: [onnx_dir, '--backend', 'onnxruntime', '--ort-kernels',
                      kernels] for kernels in ('exact', 'integer')}
    runs['deploy'] = [qat_ckpt, '--numerics', 'deploy']
    metrics = {}
    for name, args in runs.items():
        out = osp.join(work, f'test_{name}_metrics.json')
        run_tool([osp.join(HERE, 'test.py'), QAT_CONFIG, *args,
                  '--work-dir', work, '--out', out,
                  '--cfg-options', *data_options(root)],
                 osp.join(work, f'test_{name}.log'))
        with open(out) as f:
            metrics[name] = json.load(f)
    return metrics


if __name__ == '__main__':
    main()
