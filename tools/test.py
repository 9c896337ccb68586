"""Test a checkpoint at every bit-width (same CLI as mmdet's tools/test.py).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--bits 8 4]
        [--subnets a.json ...] [--out results.json] [--cfg-options k=v ...]
        [--launcher pytorch] [--backend onnxruntime] [--numerics deploy]

For an mmdrq model the test loop becomes MultiBitTestLoop: every bit (or
--bits, and each --subnets file) is evaluated and a table is logged. With
``--backend onnxruntime`` CHECKPOINT is an export folder
(tools/export_onnx.py) whose ONNX files run instead (--subnets: names);
``--numerics deploy`` makes PyTorch compute what those files compute in
ONNX Runtime's exact kernels.
"""
import argparse
import json

from mmengine.runner import Runner

import mmdrq  # noqa: F401 (registers mmdrq's modules, mmdrq:: configs)
from mmdrq.tools_common import (add_common_args, check_out_file,
                                configure_test, finish_launch, is_qat_config,
                                load_config, prepare_launch)
from mmdrq.utils import atomic_write


def parse_args():
    parser = argparse.ArgumentParser(description='Test a model per bit')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--bits', type=int, nargs='+',
                        help='bit-widths to test (default: all)')
    parser.add_argument('--subnets', nargs='+',
                        help='SubNet JSON files (per-layer bits) to test')
    parser.add_argument('--out', help='write the metrics as JSON here')
    parser.add_argument('--backend', default='pytorch',
                        choices=['pytorch', 'onnxruntime'])
    parser.add_argument('--ort-kernels', default='exact',
                        choices=['exact', 'integer', 'nbits', 'nbits_int8'],
                        help='onnxruntime: exact integer sums (equal to '
                        '--numerics deploy in PyTorch), fused integer '
                        'kernels, or weight-only linears as MatMulNBits '
                        '(language models: float input, or nbits_int8 '
                        'with the input blocks quantized to int8 at run '
                        'time; see mmdrq_runtime.session)')
    parser.add_argument('--numerics', default='fake',
                        choices=['fake', 'deploy'],
                        help='pytorch: the fake-quantized forward of '
                        'training, or the float operations of the ONNX '
                        "export (equal to --backend onnxruntime's exact "
                        'kernels; see mmdrq.quantization.deploy_numerics)')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    if args.out:
        check_out_file('--out', args.out, [args.config, args.checkpoint])
    cfg = load_config(args)
    if (args.bits or args.subnets) and not is_qat_config(cfg):
        raise ValueError('--bits/--subnets need an mmdrq model config '
                         f'(model.type={cfg.model.get("type")!r})')
    if args.numerics != 'fake' and (args.backend != 'pytorch' or
                                    not is_qat_config(cfg)):
        raise ValueError(f'--numerics {args.numerics} needs --backend '
                         'pytorch and an mmdrq model config')
    if args.ort_kernels != 'exact' and args.backend != 'onnxruntime':
        raise ValueError(f'--ort-kernels {args.ort_kernels} needs --backend '
                         'onnxruntime (it picks ONNX Runtime\'s kernels)')
    options = {} if args.numerics == 'fake' else \
        dict(numerics=args.numerics)
    configure_test(cfg, args.checkpoint, args.bits, args.subnets,
                   args.backend, args.ort_kernels, **options)
    prepare_launch(cfg)
    runner = Runner.from_cfg(cfg)
    metrics = runner.test()
    if args.out:
        text = json.dumps({k: float(v) if hasattr(v, '__float__') else v
                           for k, v in metrics.items()}, indent=1)
        atomic_write(args.out, lambda f: f.write(text.encode()))
    del runner  # it holds the process group (finish_launch)
    finish_launch()


if __name__ == '__main__':
    main()
