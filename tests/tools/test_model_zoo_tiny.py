"""Modern detection and segmentation models through the real tools on the
tiny synthetic datasets (issue 13): DINO, a DCNv2 RetinaNet and Mask R-CNN
on the tiny COCO, SegFormer and Mask2Former on the tiny ADE20K. Each is
trained at every bit by tools/train.py and tested at every bit by
tools/test.py through the dataset's metric; then one test batch of the
trained checkpoint is traced (mmdrq.quantization.coverage): every conv,
linear and attention weight (projections, deformable convs, transposed
convs) runs quantized but the first and prediction layers."""
import json
import math
import os.path as osp
import time

import pytest
import torch

from conftest import TOOLS, logged, run_tool, tiny_data_options

pytestmark = pytest.mark.slow  # trains through the tools

BITS = (8, 6, 4, 2)
COCO = ('coco', 'epoch_1.pth', 'coco/bbox_mAP', 1.0)
ADE20K = ('ade20k', 'iter_4.pth', 'mIoU', 100.0)
CASES = {
    # name: config, (dataset, checkpoint, metric, its upper bound)
    'dino': ('configs/detection/dino-4scale_r18_drq-8642_tiny.py', COCO),
    'dcnv2_retinanet': (
        'configs/detection/retinanet_r50-mdconv-c3-c5_drq-8642_tiny.py', COCO),
    'mask_rcnn': ('configs/detection/mask-rcnn_r18_fpn_drq-8642_tiny.py',
                  COCO),
    'segformer': ('configs/segmentation/segformer_mit_drq-8642_tiny.py',
                  ADE20K),
    'mask2former': ('configs/segmentation/mask2former_r18_drq-8642_tiny.py',
                    ADE20K),
}
# models the ONNX export refuses, and a word of the reason it names
EXPORT_REFUSED = {'dino': 'DETR-style', 'mask2former': 'MaskFormer-style'}


def _trace_test_batch(config, ckpt, options):
    """The weight uses of one test batch of the trained model, and the
    model."""
    from mmengine.runner import Runner

    from mmdrq.apis import load_trained
    from mmdrq.quantization.coverage import tracing_weight_uses
    cfg, model, architecture = load_trained(
        config, ckpt, dict(option.split('=', 1) for option in options))
    batch = next(iter(Runner.build_dataloader(cfg.test_dataloader)))
    model.eval()
    with torch.no_grad(), tracing_weight_uses(architecture) as uses:
        model.test_step(batch)
    return uses, architecture


@pytest.mark.parametrize('name', list(CASES))
def test_train_and_test_every_bit(name, data, tiny_training, tmp_path):
    config, (dataset, ckpt, metric, high) = CASES[name]
    options = tiny_data_options(dataset, data[dataset])
    work, log = tiny_training(config, dataset)  # tools/train.py, shared
    # every bit trains every iteration (4: logger interval 1) with finite
    # losses, and validation covers every bit
    for bit in BITS:
        losses = logged(log, f'loss@w{bit}a{bit}')
        assert len(losses) == 4, (bit, losses)
        assert all(math.isfinite(v) for v in losses), (bit, losses)
    val = {bit: logged(log, f'{metric}@w{bit}a{bit}') for bit in BITS}
    assert all(val.values()), val

    out = tmp_path / 'metrics.json'
    _, log = run_tool(osp.join(TOOLS, 'test.py'), config, work / ckpt,
                      '--work-dir', tmp_path / 'test', '--out', out,
                      '--cfg-options', *options)
    assert 'test metrics per bit-width' in log and '| w2a2 |' in log
    metrics = json.loads(out.read_text())
    for bit in BITS:
        value = metrics[f'{metric}@w{bit}a{bit}']
        assert 0.0 <= value <= high, (bit, value)
        # the checkpoint reproduces the end-of-training validation
        assert abs(value - val[bit][-1]) < 1e-3, (bit, value, val[bit])

    # every conv, linear and attention weight the batch reaches runs
    # quantized but the first and prediction layers the defaults keep FP
    uses, architecture = _trace_test_batch(config, str(work / ckpt), options)
    print(f'\n{name}: {uses.summary()}')
    assert uses.fp_layers() == {} and not uses.unused(), uses.summary()
    assert set(uses.fp_layers(kept=True)) and \
        uses.share(('quantized', )) > 0.9, uses.summary()

    # the ONNX export refuses a model it has no form for at once, by name
    from mmdrq.deploy import check_exportable
    if name in EXPORT_REFUSED:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=EXPORT_REFUSED[name]) as error:
            check_exportable(architecture)
        assert time.perf_counter() - start < 2.0
        assert type(architecture).__name__ in str(error.value)
    else:
        check_exportable(architecture)
