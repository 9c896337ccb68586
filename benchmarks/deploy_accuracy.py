"""What the export modes that are not bit-equal cost in accuracy: top-1
per bit of PyTorch against ONNX Runtime for each export mode, on a
classifier's test set (the README's digits model).

    python benchmarks/deploy_accuracy.py CONFIG CKPT [--out-dir DIR]
        [--calib-batches 4] [--input-shape 1 3 16 16] [--threads 1]

Modes: the default export (residual adds float, FP layers float32), the
residual adds quantized with calibrated scales (``--residual-qdq
calibrated``), and that with the FP layers as float16 or int8 weights,
or quantized to int8 after training (``--fp-layers int8``). Each
is run with ONNX Runtime's exact kernels (the graph's float computation)
and its integer kernels. Reports top-1 and how many test images' top-1
class differs from PyTorch's. Writes ``deploy_accuracy.md`` and ``.json``.
"""
import argparse
import json
import os
import os.path as osp

import numpy as np
import torch

from mmdrq.deploy import SwitchableSession, export_to_folder
from mmdrq.deploy.pipeline import calibration_batches, load_for_export
from mmdrq.quantization import model_bits, use_bits
from mmdrq.utils.atomic import atomic_write

MODES = {
    'float residual (bit-equal)': dict(),
    'calibrated residual': dict(residual_qdq='calibrated'),
    'calibrated + FP layers float16': dict(residual_qdq='calibrated',
                                           fp_layers='float16'),
    'calibrated + FP layers int8 weights': dict(residual_qdq='calibrated',
                                                fp_layers='int8_weights'),
    'calibrated + FP layers int8': dict(residual_qdq='calibrated',
                                        fp_layers='int8'),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out-dir', default='work_dirs/deploy_accuracy')
    parser.add_argument('--calib-batches', type=int, default=4)
    parser.add_argument('--input-shape', type=int, nargs=4,
                        default=[1, 3, 16, 16])
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    from mmengine.runner import Runner
    cfg, model = load_for_export(args.config, args.checkpoint)
    bits = list(model_bits(model))
    loader = Runner.build_dataloader(cfg.test_dataloader)
    batches = [(model.data_preprocessor(data, False)['inputs'],
                torch.cat([s.gt_label for s in data['data_samples']]))
               for data in loader]
    labels = torch.cat([b[1] for b in batches]).numpy()
    calibration = calibration_batches(cfg, model, args.calib_batches,
                                      args.input_shape)
    reference = {}
    for bit in bits:
        with use_bits(model, bit), torch.no_grad():
            reference[bit] = np.concatenate(
                [model(x, mode='tensor').argmax(1).numpy()
                 for x, _ in batches])
    results = {'PyTorch': {bit: dict(top1=float(
        (reference[bit] == labels).mean() * 100)) for bit in bits}}
    for mode, options in MODES.items():
        folder = osp.join(args.out_dir, mode.split(' (')[0].replace(
            ' + ', '_').replace(' ', '_'))
        export_to_folder(model, folder, bits, None, args.input_shape,
                         calibration=calibration if options else None,
                         overwrite=True, **options)
        for kernels in ('exact', 'integer'):
            session = SwitchableSession(folder, args.threads, kernels)
            row = results[f'{mode}, {kernels} kernels'] = {}
            for bit in bits:
                session.set_bits(bit)
                predicted = np.concatenate(
                    [session.run(x.numpy())[0].argmax(1) for x, _ in batches])
                row[bit] = dict(
                    top1=float((predicted == labels).mean() * 100),
                    differ=int((predicted != reference[bit]).sum()))
    header = ['ONNX Runtime export'] + [f'w{b}a{b} top-1 (differ)'
                                        for b in bits]
    lines = ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    for name, row in results.items():
        lines.append('| ' + ' | '.join([name] + [
            f'{row[b]["top1"]:.2f}' + (f' ({row[b]["differ"]})'
                                       if 'differ' in row[b] else '')
            for b in bits]) + ' |')
    text = '\n'.join(lines) + (
        f'\n\n{len(labels)} test images; (differ) = images whose top-1 class '
        "differs from PyTorch's at that bit; calibration: "
        f'{sum(len(c) for c in calibration)} training images.\n')
    os.makedirs(args.out_dir, exist_ok=True)
    atomic_write(osp.join(args.out_dir, 'deploy_accuracy.md'),
                 lambda f: f.write(text.encode()))
    data = json.dumps(results, indent=1).encode()
    atomic_write(osp.join(args.out_dir, 'deploy_accuracy.json'),
                 lambda f: f.write(data))
    print(text)


if __name__ == '__main__':
    main()
