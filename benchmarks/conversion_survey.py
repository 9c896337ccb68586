"""Which OpenMMLab model families mmdrq converts fully, and which layers it
leaves FP and why: builds one config per family directory of mmpretrain,
mmdet and mmseg (random init, no download), converts it, and tabulates.
Besides the conversion table, one predict forward (eval mode, a random
image) is traced (mmdrq.quantization.coverage): the share of the conv,
linear and attention weights (by parameter count) it uses quantized, the
share the defaults keep FP (first and prediction layers), and every other
weight it uses FP, grouped by reason.

    python benchmarks/conversion_survey.py [--packages mmpretrain mmdet mmseg]
        [--families dcnv2 segformer ...] [--limit N] [--forward-timeout S]
        [--out benchmarks/results/conversion_survey.md]

A family whose model cannot be built offline (missing optional dependency,
a config needing pretrained files) is listed as not built, with the error.
"""
import argparse
import collections
import copy
import glob
import importlib
import os
import os.path as osp
import signal
import tempfile
import traceback

import torch

import mmdrq
from mmdrq.quantization.coverage import tracing_weight_uses
from mmdrq.quantization.layers import QuantLayer

SCOPES = {'mmpretrain': 'mmpretrain', 'mmdet': 'mmdet', 'mmseg': 'mmseg'}
SKIP_DIRS = {'_base_', 'common', 'benchmarks', 'misc', 'legacy_1.x'}


def family_configs(package):
    root = osp.join(osp.dirname(importlib.import_module(package).__file__),
                    '.mim', 'configs')
    for family in sorted(os.listdir(root)):
        if family in SKIP_DIRS or not osp.isdir(osp.join(root, family)):
            continue
        configs = sorted(glob.glob(osp.join(root, family, '*.py')))
        if configs:
            yield family, configs[0]


def strip_pretrained(cfg):
    """Set every init_cfg / pretrained / checkpoint reference to None."""
    if isinstance(cfg, dict):
        for key in list(cfg):
            if key in ('init_cfg', 'pretrained') or key == 'checkpoint' and \
                    isinstance(cfg[key], str):
                cfg[key] = None
            else:
                strip_pretrained(cfg[key])
        if cfg.get('type') in ('SyncBN', 'MMSyncBN'):
            cfg['type'] = 'BN'
    elif isinstance(cfg, list):
        for item in cfg:
            strip_pretrained(item)


def survey_one(package, path, timeout):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    model_cfg = copy.deepcopy(cfg.model)  # ConfigDict: mmdet reads attrs
    strip_pretrained(model_cfg)
    init_default_scope(SCOPES[package])
    registry = importlib.import_module(f'{package}.registry').MODELS
    model = registry.build(model_cfg)
    mmdrq.quantize_model(model, bits=[8, 4])
    quantized = sum(isinstance(m, QuantLayer) for m in model.modules())
    reasons = collections.Counter()
    for row in model.mmdrq_report:
        if row.decision == 'fp' and not row.by_default:
            reasons[row.detail] += 1
    return quantized, reasons, forward_coverage(model, package, timeout)


def _predict_inputs(package):
    """A random image and, for mmdet and mmseg, its data sample, as the
    models' ``predict`` reads them."""
    # 256: DINO's 900 queries are picked among the 4 levels' positions
    size = dict(mmpretrain=224, mmdet=256, mmseg=128)[package]
    inputs = torch.randn(1, 3, size, size)
    if package == 'mmpretrain':
        return inputs, None
    shape = (size, size)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape,
                batch_input_shape=shape, scale_factor=(1.0, 1.0), img_id=0,
                padding_size=[0, 0, 0, 0], flip=False)
    if package == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    return inputs, [Sample(metainfo=meta)]


def _out_of_time(signum, frame):
    raise TimeoutError


def forward_coverage(model, package, timeout):
    """The traced weight uses of one predict forward (or why there are none:
    the forward does not run on a bare random image, or takes more than
    ``timeout`` seconds: mmseg's SAN ran over 10 minutes)."""
    inputs, samples = _predict_inputs(package)
    model.eval()
    handler = signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(timeout)
    try:
        with torch.no_grad(), tracing_weight_uses(model) as uses:
            if samples is None:
                model(inputs, mode='tensor')
            else:
                model(inputs, samples, mode='predict')
    except TimeoutError:
        return f'forward not run (over {timeout} s)'
    except Exception as e:  # a survey: say the forward did not run
        return f'forward not run ({type(e).__name__})'
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, handler)
    return uses


def _coverage_cells(uses):
    """The three forward columns: quantized share (and how many weights
    the forward did not use: eval-mode auxiliary heads, branches without
    detections), share kept FP by skip_first_last, the other FP weights by
    reason (a few names each)."""
    if isinstance(uses, str):
        return [uses, '', '']
    fp = ('fp', 'mixed')
    by_reason = collections.defaultdict(list)
    for name, reason in uses.fp_layers().items():
        by_reason[reason].append(name)
    others = '; '.join(
        f'{len(names)} x {reason}'
        f' ({", ".join(names[:2])}{", ..." if len(names) > 2 else ""})'
        for reason, names in by_reason.items())
    unused = len(uses.unused())
    return [f'{uses.share(("quantized", )):.1%}' +
            (f' ({unused} weights unused)' if unused else ''),
            f'{uses.share(fp, kept=True):.1%}',
            f'{uses.share(fp, kept=False):.1%}' + (f': {others}'
                                                   if others else '')]


def add_family_args(parser):
    """Which families a survey runs: --packages, --families, --limit."""
    parser.add_argument('--packages', nargs='+', default=list(SCOPES))
    parser.add_argument('--families', nargs='+',
                        help='only these family directories')
    parser.add_argument('--limit', type=int, default=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_family_args(parser)
    parser.add_argument('--forward-timeout', type=int, default=300,
                        help='seconds for the traced forward of one family')
    parser.add_argument('--out', default=osp.join(
        osp.dirname(osp.abspath(__file__)), 'results',
        'conversion_survey.md'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ['| package | family | config | quantized layers | left FP by '
             'conversion (beyond first/prediction layers) | forward: weights '
             'quantized | forward: FP kept by skip_first_last | forward: '
             'other FP weights (why) |', '|---|---|---|---|---|---|---|---|']
    for package in args.packages:
        for count, (family, path) in enumerate(family_configs(package)):
            if args.families and family not in args.families:
                continue
            if args.limit and count >= args.limit:
                break
            name = osp.basename(path)
            try:
                quantized, reasons, uses = survey_one(package, path,
                                                      args.forward_timeout)
                fp = ', '.join(f'{n} x {r}' for r, n in reasons.items()) \
                    or 'none: converts fully'
                row = ' | '.join([f'| {package}', family, name,
                                  str(quantized), fp] +
                                 _coverage_cells(uses)) + ' |'
            except Exception as e:  # a survey: report, go on
                last = traceback.format_exception_only(type(e), e)[-1]
                row = (f'| {package} | {family} | {name} | not built | '
                       f'{last.strip()[:120]} | | | |')
            print(row, flush=True)
            lines.append(row)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=osp.dirname(args.out),
                                     delete=False) as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(f.name, args.out)
    print(f'saved {args.out}')


if __name__ == '__main__':
    main()
