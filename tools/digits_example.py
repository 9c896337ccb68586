"""The built-in example, end to end on a CPU: scikit-learn's digits written
as an mmpretrain dataset, FP32 training, one-shot {8,6,4,2} Double Rounding
QAT from the FP32 checkpoint, then the per-bit test table and the integer
export. Every step is the ordinary tool a user runs (tools/train.py,
tools/test.py, tools/export_int.py).

    python tools/digits_example.py [--work-dir work_dirs/digits]
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

HERE = osp.dirname(osp.abspath(__file__))
CONFIGS = osp.join(HERE, '..', 'configs', 'classification', 'digits')


def run(args, log_path):
    """Run a tool, its output going to ``log_path``; fail loudly."""
    start = time.time()
    with open(log_path, 'w') as log:
        done = subprocess.run([sys.executable] + args, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f'{" ".join(args)} failed:\n{tail}')
    return time.time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/digits')
    parser.add_argument('--data-root', default='data/digits')
    parser.add_argument('--fp32-epochs', type=int, default=30)
    parser.add_argument('--qat-epochs', type=int, default=10)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    work = osp.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    root = osp.abspath(args.data_root)
    data = [f'{k}={root}' for k in (
        'train_dataloader.dataset.data_root', 'val_dataloader.dataset.'
        'data_root', 'test_dataloader.dataset.data_root')]
    seed = [f'randomness.seed={args.seed}']

    sys.path.insert(0, HERE)
    from prepare_digits import write_digits
    print(f'[1/4] digits dataset in {root}: {write_digits(root)}')

    fp_dir = osp.join(work, 'fp32')
    t = run([osp.join(HERE, 'train.py'),
             osp.join(CONFIGS, 'resnet_digits_fp32.py'), '--work-dir', fp_dir,
             '--cfg-options', f'train_cfg.max_epochs={args.fp32_epochs}',
             f'train_cfg.val_interval={args.fp32_epochs}',
             f'param_scheduler.T_max={args.fp32_epochs}'] + data + seed,
            osp.join(work, 'fp32.log'))
    fp_ckpt = osp.join(fp_dir, f'epoch_{args.fp32_epochs}.pth')
    fp_metrics = osp.join(work, 'fp32_test.json')
    run([osp.join(HERE, 'test.py'),
         osp.join(CONFIGS, 'resnet_digits_fp32.py'), fp_ckpt, '--work-dir',
         fp_dir, '--out', fp_metrics, '--cfg-options'] + data,
        osp.join(work, 'fp32_test.log'))
    print(f'[2/4] FP32 training: {t:.0f} s')

    qat_dir = osp.join(work, 'drq_8642')
    qat_cfg = osp.join(CONFIGS, 'resnet_digits_drq_8642.py')
    t = run([osp.join(HERE, 'train.py'), qat_cfg, '--work-dir', qat_dir,
             '--cfg-options', f'load_from={fp_ckpt}',
             f'train_cfg.max_epochs={args.qat_epochs}',
             f'train_cfg.val_interval={args.qat_epochs}',
             f'param_scheduler.T_max={args.qat_epochs}'] + data + seed,
            osp.join(work, 'qat.log'))
    print(f'[3/4] one-shot {{8,6,4,2}} QAT: {t:.0f} s')
    qat_ckpt = osp.join(qat_dir, f'epoch_{args.qat_epochs}.pth')
    qat_metrics = osp.join(work, 'qat_test.json')
    run([osp.join(HERE, 'test.py'), qat_cfg, qat_ckpt, '--work-dir', qat_dir,
         '--out', qat_metrics, '--cfg-options'] + data,
        osp.join(work, 'qat_test.log'))
    int_path = osp.join(work, 'digits_int8.pth')
    run([osp.join(HERE, 'export_int.py'), qat_cfg, qat_ckpt, int_path],
        osp.join(work, 'export.log'))

    with open(fp_metrics) as f:
        fp_top1 = json.load(f)['accuracy/top1']
    with open(qat_metrics) as f:
        qat = json.load(f)
    print('[4/4] test accuracy (top-1, %) per bit-width\n')
    print('| model | top-1 | vs FP32 |\n|---|---|---|')
    print(f'| FP32 | {fp_top1:.2f} | |')
    for bit in (8, 6, 4, 2):
        top1 = qat[f'accuracy/top1@w{bit}a{bit}']
        print(f'| w{bit}a{bit} | {top1:.2f} | {top1 - fp_top1:+.2f} |')
    print(f'\ninteger checkpoint: {int_path} '
          f'({osp.getsize(int_path):,} bytes); logs in {work}')


if __name__ == '__main__':
    main()
