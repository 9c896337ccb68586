"""Detection (mmdet RetinaNet) and segmentation (mmseg DeepLabV3) exported
per bit and as a SubNet, run by ONNX Runtime with mmdet's / mmseg's own
post-processing: bbox mAP and mIoU equal tools/test.py's at every bit, and
tools/benchmark.py --backend onnxruntime reports them with images/s."""
import json
import os.path as osp

import pytest

pytest.importorskip('onnxruntime')

from conftest import ROOT, TOOLS, run_tool, tiny_data_options  # noqa: E402,E501

BITS = (8, 6, 4, 2)
SUBNET = {'backbone.layer1.0.conv1': 2, 'backbone.layer2.0.conv2': 4,
          'backbone.layer3.1.conv1': 6}


CASES = {
    # config, dataset, checkpoint, metric, input shape
    'retinanet': ('configs/detection/retinanet_r18_drq-8642_tiny.py', 'coco',
                   'epoch_1.pth', 'coco/bbox_mAP',
                  (1, 3, 96, 128)),
    'deeplabv3': ('configs/segmentation/deeplabv3_r18_drq-8642_tiny.py',
                  'ade20k', 'iter_4.pth', 'mIoU',
                  (1, 3, 64, 64)),
}


@pytest.mark.parametrize('name', list(CASES))
def test_onnxruntime_metrics_equal_pytorch(name, data, tiny_training,
                                           tmp_path):
    config, dataset, ckpt, metric, shape = CASES[name]
    config = osp.join(ROOT, config)
    cfg_options = ['--cfg-options'] + tiny_data_options(dataset, data[dataset])
    ckpt = tiny_training(config, dataset)[0] / ckpt
    subnet = tmp_path / 'mixed.json'
    subnet.write_text(json.dumps(dict(layer_bits=SUBNET)))
    onnx_dir = tmp_path / 'onnx'
    run_tool(osp.join(TOOLS, 'export_onnx.py'), config, ckpt, '--out-dir',
             onnx_dir, '--bits', *BITS, '--subnet', subnet,
             '--input-shape', *shape)
    meta = json.loads((onnx_dir / 'meta.json').read_text())
    probes = {e['name']: e['probe'] for e in meta['settings']}
    print(f'\n{name}: graph {meta["pipeline"]}, ORT against PyTorch on a '
          f'random input: {probes}')
    metrics = {}
    for backend, source, subnets in (('pytorch', ckpt, subnet),
                                     ('onnxruntime', onnx_dir, 'mixed')):
        out = tmp_path / f'{backend}.json'
        run_tool(osp.join(TOOLS, 'test.py'), config, source, '--work-dir',
                 tmp_path / backend, '--out', out, '--backend', backend,
                 '--subnets', subnets, *cfg_options)
        metrics[backend] = json.loads(out.read_text())
    tags = [f'w{b}a{b}' for b in BITS] + ['mixed']
    report = []
    for tag in tags:
        want = metrics['pytorch'][f'{metric}@{tag}']
        got = metrics['onnxruntime'][f'{metric}@{tag}']
        # mAP is a fraction, mIoU a percentage: 0.1 points either way
        points = 100 if metric.startswith('coco') else 1
        report.append(f'{tag}: PyTorch {want}, ONNX Runtime {got}')
        assert abs(got - want) * points <= 0.1, report[-1]
    print(f'\n{name} {metric}: ' + '; '.join(report))
    # tools/benchmark.py on the export: the same metrics plus images/s
    bench = tmp_path / 'bench'
    run_tool(osp.join(TOOLS, 'benchmark.py'), config, onnx_dir,
             '--data-root', data[dataset] + ('/' if dataset == 'coco' else ''),
             '--out-dir', bench, '--work-dir', tmp_path / 'bench_work',
             '--backend', 'onnxruntime', '--bits', *BITS)
    table = json.loads((bench / 'benchmark.json').read_text())
    for bit in BITS:
        tag = f'w{bit}a{bit}'
        assert table[f'{metric}@{tag}'] == \
            metrics['onnxruntime'][f'{metric}@{tag}']
        assert table[f'images_per_s@{tag}'] > 0
