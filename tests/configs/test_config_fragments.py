"""Every config loads to the same final config as before the mmdrq parts
and the small datasets moved into configs/_base_/: a golden of the run-relevant keys,
written from the configs as they were (each key's canonical JSON, hashed).
Regenerate it only for an intended change of a config:
    python tests/configs/test_config_fragments.py --write"""
import glob
import hashlib
import json
import os.path as osp
import sys

import pytest
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
GOLDEN = osp.join(osp.dirname(osp.abspath(__file__)), 'config_golden.json')
CONFIGS = sorted(
    osp.relpath(p, ROOT)
    for p in glob.glob(osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in p)
KEYS = ('model', 'optim_wrapper', 'param_scheduler', 'train_cfg', 'val_cfg',
        'test_cfg', 'model_wrapper_cfg', 'default_hooks', 'custom_hooks',
        'custom_imports', 'load_from', 'train_dataloader', 'val_dataloader',
        'test_dataloader', 'val_evaluator', 'test_evaluator')


def fingerprint(path):
    cfg = Config.fromfile(osp.join(ROOT, path)).to_dict()
    return {key: hashlib.sha256(json.dumps(
        cfg.get(key), sort_keys=True, default=repr).encode()).hexdigest()[:16]
        for key in KEYS}


def test_golden_lists_every_config():
    with open(GOLDEN) as f:
        assert sorted(json.load(f)) == CONFIGS


@pytest.mark.parametrize('path', CONFIGS)
def test_config_loads_as_before(path):
    with open(GOLDEN) as f:
        expected = json.load(f)[path]
    got = fingerprint(path)
    assert [k for k in KEYS if got[k] != expected[k]] == []


if __name__ == '__main__' and sys.argv[1:] == ['--write']:
    with open(GOLDEN, 'w') as f:
        json.dump({p: fingerprint(p) for p in CONFIGS}, f, indent=1,
                  sort_keys=True)
        f.write('\n')
