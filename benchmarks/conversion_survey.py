"""Which OpenMMLab model families mmdrq converts fully, and which layers it
leaves FP and why: builds one config per family directory of mmpretrain,
mmdet and mmseg (random init, no download), converts it, and tabulates.

    python benchmarks/conversion_survey.py [--packages mmpretrain mmdet mmseg]
        [--limit N] [--out benchmarks/results/conversion_survey.md]

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
import re
import tempfile
import traceback

import torch

import mmdrq
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


def survey_one(package, path):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    cfg = Config.fromfile(path)
    model_cfg = copy.deepcopy(cfg.model)  # ConfigDict: mmdet reads attrs
    strip_pretrained(model_cfg)
    init_default_scope(SCOPES[package])
    registry = importlib.import_module(f'{package}.registry').MODELS
    model = registry.build(model_cfg)
    mmdrq.quantize_model(model, bits=[8, 4])
    layers = [m for m in model.modules() if isinstance(m, QuantLayer)]
    quantized = len(layers)
    reasons = collections.Counter()
    for _, kind, status in model.mmdrq_report:
        if status.startswith('FP: '):
            reason = re.sub(r' \(skip_first_last\)', '', status[4:])
            if 'first layer' in reason or 'prediction' in reason:
                continue
            reasons[reason] += 1
    reasons.update(bypassed_layers(model, layers, package))
    return quantized, reasons


def bypassed_layers(model, layers, package):
    """Quantized layers that one forward never calls: their weights are
    read directly (``F.linear(x, self.qkv.weight)``), so they run FP."""
    called = set()
    handles = [m.register_forward_hook(lambda m, a, o: called.add(id(m)))
               for m in layers]
    size = 224 if package == 'mmpretrain' else 128
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, 3, size, size), mode='tensor')
    except Exception as e:  # a survey: say the check did not run
        return {f'forward check not run ({type(e).__name__})': 1}
    finally:
        for handle in handles:
            handle.remove()
    missed = sum(id(m) not in called for m in layers)
    return {'converted but not called in forward (weights read '
            'directly, or unused)': missed} if missed else {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--packages', nargs='+', default=list(SCOPES))
    parser.add_argument('--limit', type=int, default=0)
    parser.add_argument('--out', default=osp.join(
        osp.dirname(osp.abspath(__file__)), 'results',
        'conversion_survey.md'))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ['| package | family | config | quantized layers | left FP '
             '(beyond first/prediction layers) |', '|---|---|---|---|---|']
    for package in args.packages:
        for count, (family, path) in enumerate(family_configs(package)):
            if args.limit and count >= args.limit:
                break
            name = osp.basename(path)
            try:
                quantized, reasons = survey_one(package, path)
                fp = ', '.join(f'{n} x {r}' for r, n in reasons.items()) \
                    or 'none: converts fully'
                row = f'| {package} | {family} | {name} | {quantized} | {fp} |'
            except Exception as e:  # a survey: report, go on
                last = traceback.format_exception_only(type(e), e)[-1]
                row = (f'| {package} | {family} | {name} | not built | '
                       f'{last.strip()[:120]} |')
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
