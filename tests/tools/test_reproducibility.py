"""Same seed, same numbers: two runs of the real tools/train.py on the
digits give bit-identical weights, losses and metrics on the CPU, and the
digits data the runs read is exactly scikit-learn's, whatever an earlier
interrupted write left behind."""
import glob
import json
import os
import os.path as osp

import pytest
import torch

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)
from mmdrq.datasets import write_digits
from conftest import ROOT, TOOLS, run_tool

pytestmark = pytest.mark.slow  # trains through the tools


DIGITS = osp.join(ROOT, 'configs', 'classification', 'digits')
# what changes from run to run by design: wall-clock times
TIMES = ('time', 'data_time', 'eta')


def dataset_size(root, split):
    from mmpretrain.datasets import CustomDataset
    return len(CustomDataset(data_root=root, data_prefix=split,
                             pipeline=[]))


def test_leftover_of_an_interrupted_write_is_not_a_sample(tmp_path):
    """A file left by a write that was killed midway must not join the
    dataset unnoticed (it would add a sample and reshuffle every epoch)."""
    import cv2
    import numpy as np
    root = str(tmp_path / 'data')
    expected = write_digits(root)
    # the temporary name of the old writer, which CustomDataset lists
    leftover = osp.join(root, 'train', '0', '0000.png.tmp.png')
    cv2.imwrite(leftover, np.zeros((8, 8), np.uint8))
    assert dataset_size(root, 'train') == expected['train'] + 1
    with pytest.raises(ValueError, match=r'0000\.png\.tmp\.png'):
        write_digits(root)
    # once it is gone, the data is the digits again
    os.remove(leftover)
    assert write_digits(root) == expected
    assert {s: dataset_size(root, s) for s in expected} == expected


def write_config(folder, data_root):
    """The digits QAT config from scratch (no FP32 checkpoint: the seed
    also draws the initial weights), with the example's random crop,
    shuffling and two loader workers."""
    path = osp.join(folder, 'qat.py')
    with open(path, 'w') as f:
        f.write(f"""_base_ = {osp.join(DIGITS, 'resnet_digits_drq_8642.py')!r}
data_root = {data_root!r}
train_dataloader = dict(batch_size=16, num_workers=2, dataset=dict(
    data_root=data_root, indices=48))
val_dataloader = dict(dataset=dict(data_root=data_root, indices=48))
test_dataloader = val_dataloader
default_hooks = dict(logger=dict(interval=1))
train_cfg = dict(max_epochs=2, val_interval=2)
param_scheduler = dict(T_max=2, begin=0, end=2)
randomness = dict(seed=7, deterministic=True)
""")
    return path


def run_record(config, work):
    """(logged scalars without wall-clock times, final state dict)."""
    run_tool(osp.join(TOOLS, 'train.py'), config, '--work-dir', work)
    [scalars] = glob.glob(osp.join(work, '*', 'vis_data', 'scalars.json'))
    with open(scalars) as f:
        records = [{k: v for k, v in json.loads(line).items()
                    if k not in TIMES} for line in f]
    state = torch.load(osp.join(work, 'epoch_2.pth'),
                       map_location='cpu')['state_dict']
    return records, state


def test_same_seed_gives_identical_runs(tmp_path):
    data_root = str(tmp_path / 'data')
    write_digits(data_root)
    config = write_config(tmp_path, data_root)
    first, first_state = run_record(config, tmp_path / 'first')
    second, second_state = run_record(config, tmp_path / 'second')
    assert any('accuracy/top1@w2a2' in r for r in first)  # validated
    assert sum('loss@w2a2' in r for r in first) == 6  # 3 iterations x 2
    assert first == second  # every loss, lr and metric, all digits
    assert first_state.keys() == second_state.keys()
    for key, value in first_state.items():
        assert torch.equal(value, second_state[key]), key
