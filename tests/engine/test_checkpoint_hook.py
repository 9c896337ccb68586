"""AtomicCheckpointHook on MMEngine's real Runner (a two-weight model, a
metric that replays given scores): a failure while a checkpoint is written
loses nothing, old files go only after their successors are complete; and
the choice of checkpoint for ``--resume``."""
import glob
import os
import os.path as osp
import uuid

import pytest
import torch
from mmengine.config import Config
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)
from mmdrq.engine import AtomicCheckpointHook, resume_checkpoint

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class LineModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        out = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return dict(loss=(out - torch.stack(data_samples)).pow(2).mean())
        return out


class PointsDataset(Dataset):
    metainfo = dict()

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return dict(inputs=torch.full((2, ), float(index)),
                    data_samples=torch.ones(1))


class ReplayedScore(BaseMetric):
    """Returns ``scores[i]`` at the i-th validation."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def process(self, data_batch, data_samples):
        self.results.append(0)

    def compute_metrics(self, results):
        return dict(score=self.scores.pop(0))


MODELS.register_module(module=LineModel, force=True)
DATASETS.register_module(module=PointsDataset, force=True)
METRICS.register_module(module=ReplayedScore, force=True)


def build_runner(work_dir, max_epochs, scores=(), **checkpoint):
    loader = dict(dataset=dict(type='PointsDataset'), batch_size=2,
                  num_workers=0,
                  sampler=dict(type='DefaultSampler', shuffle=False))
    validation = dict(val_dataloader=loader, val_cfg=dict(),
                      val_evaluator=dict(type='ReplayedScore',
                                         scores=scores)) if scores else {}
    return Runner(
        model=dict(type='LineModel'), work_dir=str(work_dir),
        experiment_name=f'ckpt_{uuid.uuid4().hex}',
        train_dataloader=loader,
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs,
                       val_interval=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=dict(
            type='mmdrq.AtomicCheckpointHook', interval=1, **checkpoint)),
        **validation)


def fail_writing(monkeypatch, epoch, best):
    """Make torch.save fail on the checkpoint of ``epoch`` (the best one,
    which has no optimizer state, or the epoch one), as a full disk would."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get('meta', {}).get('epoch') == \
                epoch and ('optimizer' not in obj) == best:
            raise OSError(28, 'No space left on device')
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)


def files(folder):
    """The files in ``folder`` but the config the Runner dumps there."""
    return sorted(n for n in os.listdir(folder) if not n.endswith('.py')
                  and not osp.isdir(osp.join(folder, n)))


def last_checkpoint(folder):
    with open(osp.join(folder, 'last_checkpoint')) as f:
        return f.read()


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    runner = build_runner(tmp_path, max_epochs=2, max_keep_ckpts=1)
    assert any(isinstance(h, AtomicCheckpointHook) for h in runner.hooks)
    fail_writing(monkeypatch, epoch=2, best=False)
    with pytest.raises(OSError, match='No space left'):
        runner.train()
    assert files(tmp_path) == ['epoch_1.pth', 'last_checkpoint']
    assert last_checkpoint(tmp_path) == str(tmp_path / 'epoch_1.pth')
    assert torch.load(tmp_path / 'epoch_1.pth')['meta']['epoch'] == 1


def test_failed_best_write_keeps_the_previous_best(tmp_path, monkeypatch):
    runner = build_runner(tmp_path, max_epochs=2, scores=[0.1, 0.2],
                          max_keep_ckpts=1, save_best='score', rule='greater')
    fail_writing(monkeypatch, epoch=2, best=True)
    with pytest.raises(OSError, match='No space left'):
        runner.train()
    best = torch.load(tmp_path / 'best_score_epoch_1.pth')
    assert best['meta']['epoch'] == 1
    # the epoch-2 checkpoint was complete before the best one was tried
    assert files(tmp_path) == ['best_score_epoch_1.pth', 'epoch_2.pth',
                               'last_checkpoint']


def test_outdated_files_are_removed_after_their_successors(tmp_path):
    # a leftover of a killed run: removed when training starts
    (tmp_path / '.epoch_9.pth.x1y2z3.tmp').write_bytes(b'half')
    runner = build_runner(tmp_path, max_epochs=3, scores=[0.1, 0.3, 0.2],
                          max_keep_ckpts=1, save_best='score', rule='greater')
    runner.train()
    assert files(tmp_path) == ['best_score_epoch_2.pth', 'epoch_3.pth',
                               'last_checkpoint']
    assert last_checkpoint(tmp_path) == str(tmp_path / 'epoch_3.pth')
    state = torch.load(tmp_path / 'epoch_3.pth')
    assert state['message_hub']['runtime_info']['best_ckpt'] == \
        str(tmp_path / 'best_score_epoch_2.pth')


def test_every_config_uses_the_hook():
    paths = sorted(p for p in glob.glob(
        osp.join(ROOT, 'configs', '**', '*.py'), recursive=True)
        if '_base_' not in p)  # fragments are not configs to run
    assert len(paths) > 10
    for path in paths:
        hook = Config.fromfile(path).default_hooks.checkpoint.type
        assert hook == 'mmdrq.AtomicCheckpointHook', path


@pytest.fixture(scope='module')
def two_epochs(tmp_path_factory):
    """A finished run keeping epoch_1.pth and epoch_2.pth (and a best)."""
    work = tmp_path_factory.mktemp('resume')
    build_runner(work, max_epochs=2, scores=[0.2, 0.1],
                 save_best='score', rule='greater').train()
    return work


@pytest.fixture
def work(two_epochs, tmp_path):
    """A copy of that run whose last_checkpoint names the copy's epoch 2;
    epoch 1 gets the older modification time, best_* the newest."""
    for step, name in enumerate(['epoch_1.pth', 'epoch_2.pth',
                                 'best_score_epoch_1.pth']):
        (tmp_path / name).write_bytes((two_epochs / name).read_bytes())
        os.utime(tmp_path / name, (1e9 + step, 1e9 + step))
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_2.pth'))
    return tmp_path


def test_resume_takes_what_last_checkpoint_names(work):
    assert resume_checkpoint(str(work)) == str(work / 'epoch_2.pth')


@pytest.mark.parametrize('damage', [
    'no last_checkpoint', 'empty last_checkpoint', 'named file missing',
    'named file empty', 'named file truncated', 'named file not a checkpoint'
])
def test_resume_falls_back_to_the_newest_complete_checkpoint(
        work, damage, mmengine_caplog):
    named = work / 'epoch_2.pth'
    data = named.read_bytes()
    if damage == 'no last_checkpoint':
        os.remove(work / 'last_checkpoint')
        os.remove(named)
    elif damage == 'empty last_checkpoint':
        (work / 'last_checkpoint').write_text('\n')
        os.remove(named)
    elif damage == 'named file missing':
        os.remove(named)
    elif damage == 'named file empty':
        named.write_bytes(b'')
    elif damage == 'named file truncated':
        named.write_bytes(data[:len(data) // 2])
    else:
        torch.save(torch.load(named)['state_dict'], named)
    # best_* is newer, but holds no optimizer state: not a resume point
    assert resume_checkpoint(str(work)) == str(work / 'epoch_1.pth')
    assert f'resuming from {work / "epoch_1.pth"}' in mmengine_caplog.text


def test_resume_without_a_complete_checkpoint_is_an_error(work):
    data = (work / 'epoch_1.pth').read_bytes()
    (work / 'epoch_1.pth').write_bytes(data[:100])
    os.remove(work / 'epoch_2.pth')
    with pytest.raises(FileNotFoundError,
                       match='no complete checkpoint to resume from'):
        resume_checkpoint(str(work))
    with pytest.raises(ValueError, match='epoch_1.pth.*truncated or corrupt'):
        resume_checkpoint(str(work), str(work / 'epoch_1.pth'))
    with pytest.raises(FileNotFoundError, match='epoch_2.pth.*does not exist'):
        resume_checkpoint(str(work), str(work / 'epoch_2.pth'))


def test_flipped_bytes_in_a_weight_are_refused(two_epochs, tmp_path):
    """torch reads a zip whose tensor bytes changed without complaint; the
    digest the hook wrote refuses it at load_from / tools/test.py."""
    from mmdrq.engine.checkpoint_hook import STATE_DIGEST
    good = two_epochs / 'epoch_2.pth'
    state = torch.load(good, weights_only=True)
    assert set(state['meta'][STATE_DIGEST]) == set(state['state_dict'])
    data = good.read_bytes()
    weight = state['state_dict']['linear.weight'].numpy().tobytes()
    assert data.count(weight) == 1
    damaged = tmp_path / 'damaged.pth'
    damaged.write_bytes(data.replace(weight, bytes(b ^ 0x40 for b in weight)))
    assert not torch.equal(torch.load(damaged, weights_only=True)[
        'state_dict']['linear.weight'], state['state_dict']['linear.weight'])
    runner = build_runner(tmp_path / 'run', max_epochs=1)
    runner.load_checkpoint(str(good))
    with pytest.raises(ValueError, match="tensor 'linear.weight' does not "
                       'match the SHA-256'):
        runner.load_checkpoint(str(damaged))


def test_what_tools_test_refuses_before_building_anything(two_epochs,
                                                          tmp_path):
    """tools/test.py's CHECKPOINT: a folder, a missing, truncated or
    integer file, or another pickle each get an error naming the path."""
    from conftest import TinyCNN

    from mmdrq import quantize_model, save_int
    from mmdrq.engine.checkpoint_hook import check_testable
    good = two_epochs / 'epoch_2.pth'
    check_testable(str(good))
    (tmp_path / 'onnx').mkdir()
    (tmp_path / 'onnx' / 'meta.json').write_text('{}')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:300])
    other = tmp_path / 'list.pth'
    torch.save([1, 2], other)
    model = quantize_model(TinyCNN(), bits=[8, 4])
    model(torch.randn(2, 3, 6, 6))
    save_int(model, str(tmp_path / 'int.pth'))
    cases = {'onnx': (IsADirectoryError, 'is a folder.*--backend '
                      'onnxruntime'),
             'missing.pth': (FileNotFoundError, 'does not exist'),
             'truncated.pth': (ValueError, 'cannot be read'),
             'list.pth': (ValueError, 'has no state_dict'),
             'int.pth': (ValueError, 'integer file.*export_onnx')}
    for name, (error, message) in cases.items():
        with pytest.raises(error, match=message) as info:
            check_testable(str(tmp_path / name))
        assert name in str(info.value)


def test_tools_test_out_a_folder_is_refused_first(tmp_path, monkeypatch):
    import runpy
    import sys
    monkeypatch.setattr(sys, 'argv', ['test.py', 'no_config.py', 'x.pth',
                                      '--out', str(tmp_path)])
    with pytest.raises(IsADirectoryError, match='--out .* is a folder'):
        runpy.run_path(osp.join(ROOT, 'tools', 'test.py'),
                       run_name='__main__')


def test_a_subnet_file_nested_too_deeply_is_named(tmp_path):
    from mmdrq.search.subnet import load_subnet
    path = tmp_path / 'deep.json'
    path.write_text('[' * 200000)
    with pytest.raises(ValueError, match='deep.json.*nests too deeply'):
        load_subnet(str(path))
