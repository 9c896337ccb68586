"""No lost checkpoint, through the real tools: a training run killed while
it writes a checkpoint, ``--resume`` from a missing or damaged checkpoint,
and ``tools/export_int.py`` asked to overwrite a file it should not."""
import os
import os.path as osp
import shutil

import pytest
import torch

import mmdrq  # noqa: F401 (allow-lists MMEngine checkpoint classes)
from conftest import DIGITS, TOOLS, run_tool, write_digits_config

pytestmark = pytest.mark.slow  # trains through the tools
KILLED = 86  # exit status of the killed run, to tell it from a crash

# Runs tools/train.py (argv[1:]) in this process with the file writes of
# one checkpoint cut short: once torch.save has serialised the checkpoint of
# epoch KILL_EPOCH, the next binary file opened for writing gets half the
# bytes and the process exits at once (as under SIGKILL or power loss).
KILL_LAUNCHER = f'''
import builtins, io, os, runpy, sys
import torch

KILL_EPOCH = int(os.environ['KILL_EPOCH'])
real_save, real_open = torch.save, io.open
armed = False


def save(obj, f, *args, **kwargs):
    global armed
    if isinstance(obj, dict) and \\
            obj.get('meta', {{}}).get('epoch') == KILL_EPOCH:
        armed = True
    return real_save(obj, f, *args, **kwargs)


class DyingFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os._exit({KILLED})

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def dying_open(file, mode='r', *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return DyingFile(f) if armed and 'w' in mode and 'b' in mode else f


torch.save = save
builtins.open = io.open = dying_open
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


@pytest.fixture(scope='module')
def digits(digits_data, tmp_path_factory):
    """The digits (a subset), and an FP32 config saving a checkpoint every
    epoch with ``max_keep_ckpts=1`` (the project config's setting)."""
    folder = tmp_path_factory.mktemp('ckpt_safety')
    cfg = write_digits_config(
        folder, 'fp32.py', osp.join(DIGITS, 'resnet_digits_fp32.py'),
        digits_data, 'train_cfg = dict(max_epochs=2, val_interval=10)\n'
        'param_scheduler = dict(T_max=2, begin=0, end=2)\n'
        'default_hooks = dict(checkpoint=dict(interval=1, max_keep_ckpts=1))',
        train_images=64, eval_images=32)
    return dict(folder=folder, cfg=cfg)


@pytest.fixture(scope='module')
def killed_run(digits):
    """A 2-epoch run killed halfway through writing ``epoch_2.pth``."""
    work = digits['folder'] / 'killed'
    launcher = digits['folder'] / 'kill_launcher.py'
    launcher.write_text(KILL_LAUNCHER)
    os.environ['KILL_EPOCH'] = '2'
    try:
        code, log = run_tool(launcher, osp.join(TOOLS, 'train.py'),
                             digits['cfg'], '--work-dir', work,
                             expect_ok=False)
    finally:
        del os.environ['KILL_EPOCH']
    assert code == KILLED, log[-4000:]
    assert 'Saving checkpoint at 2 epochs' in log
    # for the tests that damage a run (the kill test resumes this one)
    shutil.copy(work / 'epoch_1.pth', digits['folder'] / 'epoch_1.pth')
    return work


def resumed_epoch(log):
    for line in log.splitlines():
        if 'resumed epoch: ' in line:
            return int(line.split('resumed epoch: ')[1].split(',')[0])
    return None


def test_kill_while_saving_keeps_the_previous_checkpoint(digits, killed_run):
    work = killed_run
    last = (work / 'last_checkpoint').read_text().strip()
    assert osp.basename(last) == 'epoch_1.pth'
    state = torch.load(last, map_location='cpu')  # weights_only: complete
    assert state['meta']['epoch'] == 1 and 'optimizer' in state
    # the kill hit the write: its half file is a temporary one
    assert not osp.exists(work / 'epoch_2.pth')
    assert [n for n in os.listdir(work) if n.startswith('.epoch_2.pth.')]

    _, log = run_tool(osp.join(TOOLS, 'train.py'), digits['cfg'],
                      '--work-dir', work, '--resume')
    assert resumed_epoch(log) == 1
    last = (work / 'last_checkpoint').read_text().strip()
    assert osp.basename(last) == 'epoch_2.pth'
    assert torch.load(last, map_location='cpu')['meta']['epoch'] == 2
    # max_keep_ckpts=1 removed epoch 1 once epoch 2 was complete, and the
    # half-written temporary file of the killed run is gone
    leftovers = [n for n in os.listdir(work) if not osp.isdir(work / n)]
    assert sorted(leftovers) == ['epoch_2.pth', 'fp32.py', 'last_checkpoint']


def test_resume_skips_a_truncated_last_checkpoint(digits, killed_run,
                                                  tmp_path):
    work = tmp_path / 'work'
    work.mkdir()
    shutil.copy(digits['folder'] / 'epoch_1.pth', work)
    data = (work / 'epoch_1.pth').read_bytes()
    (work / 'epoch_2.pth').write_bytes(data[:len(data) // 2])
    (work / 'last_checkpoint').write_text(str(work / 'epoch_2.pth'))
    _, log = run_tool(osp.join(TOOLS, 'train.py'), digits['cfg'],
                      '--work-dir', work, '--resume', '--cfg-options',
                      'train_cfg.max_epochs=1')
    assert 'epoch_2.pth' in log and 'truncated or corrupt' in log
    assert f'resuming from {work / "epoch_1.pth"}' in log
    assert resumed_epoch(log) == 1


@pytest.mark.parametrize('how', [['--resume'],
                                 ['--cfg-options', 'resume=True']])
def test_resume_with_nothing_to_resume_is_an_error(digits, tmp_path, how):
    work = tmp_path / 'empty'
    code, log = run_tool(osp.join(TOOLS, 'train.py'), digits['cfg'],
                         '--work-dir', work, *how, expect_ok=False)
    assert code != 0
    assert str(work / 'last_checkpoint') in log and 'does not exist' in log
    assert 'no complete checkpoint' in log
    assert not osp.exists(work)  # refused before the Runner made the dir


@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_resume_from_a_bad_file_fails_before_the_runner(digits, killed_run,
                                                        tmp_path, damage):
    work = tmp_path / 'work'
    ckpt = tmp_path / 'given.pth'
    if damage == 'truncated':
        data = (digits['folder'] / 'epoch_1.pth').read_bytes()
        ckpt.write_bytes(data[:len(data) // 2])
    code, log = run_tool(osp.join(TOOLS, 'train.py'), digits['cfg'],
                         '--work-dir', work, '--resume', ckpt,
                         expect_ok=False)
    assert code != 0
    assert str(ckpt) in log
    assert ('does not exist' if damage == 'missing'
            else 'truncated or corrupt') in log
    assert not osp.exists(work)  # the Runner (it makes the dir) never ran


@pytest.fixture(scope='module')
def qat_state(digits):
    """A bare state dict of the digits QAT model (untrained: enough for
    export_int) and its integer file."""
    from mmengine.config import Config
    from mmdrq.apis import build_model_from_config
    cfg = osp.join(DIGITS, 'resnet_digits_drq_8642.py')
    model, architecture = build_model_from_config(Config.fromfile(cfg))
    path = digits['folder'] / 'qat_state.pth'
    torch.save(model.state_dict(), path)
    mmdrq.save_int(architecture, digits['folder'] / 'int.pth')
    return cfg, path


def export(cfg, ckpt, out, *extra, expect_ok=True):
    return run_tool(osp.join(TOOLS, 'export_int.py'), cfg, ckpt, out,
                    *extra, expect_ok=expect_ok)


@pytest.mark.parametrize('how', ['same path', 'other path', 'symlink'])
def test_export_refuses_to_overwrite_its_input(qat_state, tmp_path, how):
    cfg, source = qat_state
    ckpt = tmp_path / 'ck.pth'
    shutil.copy(source, ckpt)
    before = ckpt.read_bytes()
    (tmp_path / 'sub').mkdir()
    out = dict(same=ckpt, other=tmp_path / 'sub' / '..' / 'ck.pth',
               symlink=tmp_path / 'link.pth')[how.split()[0]]
    if how == 'symlink':
        out.symlink_to(ckpt)
    code, log = export(cfg, ckpt, out, expect_ok=False)
    assert code != 0
    assert 'is the input checkpoint' in log and str(out) in log
    assert '--force' in log
    assert ckpt.read_bytes() == before


def test_export_refuses_to_overwrite_another_file(qat_state, tmp_path):
    cfg, ckpt = qat_state
    out = tmp_path / 'notes.pth'
    out.write_text('not a checkpoint')
    code, log = export(cfg, ckpt, out, expect_ok=False)
    assert code != 0
    assert 'not an mmdrq integer checkpoint' in log and str(out) in log
    assert out.read_text() == 'not a checkpoint'


def test_export_overwrites_an_integer_file_and_forced_input(qat_state,
                                                          tmp_path):
    from mmdrq.export.int_checkpoint import is_int_checkpoint
    cfg, source = qat_state
    out = tmp_path / 'int.pth'
    shutil.copy(source.parent / 'int.pth', out)
    assert is_int_checkpoint(out)
    _, log = export(cfg, source, out)
    assert 'wrote' in log and is_int_checkpoint(out)
    ckpt = tmp_path / 'ck.pth'
    shutil.copy(source, ckpt)
    _, log = export(cfg, ckpt, ckpt, '--force')
    assert is_int_checkpoint(ckpt)
