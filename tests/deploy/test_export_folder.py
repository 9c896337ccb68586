"""The export folder: one stored graph for every bit (each setting rebuilt
equal to its own full file), and a folder that a kill, a full disk, a
damaged file or another model's export cannot turn into wrong results."""
import errno
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip('onnxruntime')

from mmdrq import quantize_model, use_bits  # noqa: E402
from mmdrq.deploy import SwitchableSession, export_to_folder  # noqa: E402
from mmdrq.deploy import folder as folder_module  # noqa: E402
from mmdrq_runtime import ExportFolder  # noqa: E402
from mmdrq_runtime.artifact import second_rounding  # noqa: E402
from conftest import calibrate, plain  # noqa: E402

BITS = (8, 6, 4, 2)

SHAPE = (1, 3, 6, 6)
SUBNETS = {'mixed': {'conv1': 2, 'fc1': 4}, 'low': {'conv2': 2}}


@pytest.fixture(scope='module')
def model():
    from conftest import TinyCNN
    torch.manual_seed(0)
    net = TinyCNN()
    quantize_model(net, bits=list(BITS))
    return calibrate(net, (4, 3, 6, 6))


@pytest.fixture(scope='module')
def exports(model, tmp_path_factory):
    """The same settings in both layouts."""
    root = tmp_path_factory.mktemp('folders')
    folders = {}
    for layout in ('single', 'per_bit'):
        folders[layout] = str(root / layout)
        export_to_folder(model, folders[layout], BITS, SUBNETS, SHAPE, plain,
                         layout=layout)
    return folders


def folder_bytes(folder):
    return sum(osp.getsize(osp.join(folder, f)) for f in os.listdir(folder))


def test_one_graph_serves_every_setting(model, exports):
    single, per_bit = (ExportFolder(exports[k]) for k in ('single',
                                                          'per_bit'))
    assert sorted(os.listdir(exports['single'])) == [
        'low.npz', 'meta.json', 'mixed.npz', 'model.onnx', 'w2a2.npz',
        'w4a4.npz', 'w6a6.npz']
    assert single.available == per_bit.available == list(BITS) + list(
        SUBNETS)
    from mmdrq_runtime.session import drop_identity_clips
    for key in single.available:  # value for value the per-bit file
        assert drop_identity_clips(single.model(key)).SerializeToString() \
            == per_bit.model(key).SerializeToString()
    # the stored integers once; the other settings hold float values
    # (benchmarks/deploy.py measures the sizes on ResNet-18)
    for name in os.listdir(exports['single']):
        if name.endswith('.npz'):
            with np.load(osp.join(exports['single'], name)) as values:
                assert all(values[k].dtype.kind == 'f' or values[k].size == 1
                           for k in values.files)  # (and the Clip bounds)
    assert folder_bytes(exports['single']) < folder_bytes(exports['per_bit'])
    session = SwitchableSession(exports['single'])
    own_files = SwitchableSession(exports['per_bit'])
    x = torch.randn(2, 3, 6, 6)
    for key in single.available:  # the shared rewritten graph, refilled
        got = session.set_bits(key).run(x.numpy())[0]
        np.testing.assert_array_equal(
            got, own_files.set_bits(key).run(x.numpy())[0])
        with use_bits(model, SUBNETS.get(key, key)), torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4,
                                       atol=1e-5)


@pytest.mark.parametrize('rounding,mode', [('half_even', 'double_rounding'),
                                           ('half_up', 'double_rounding'),
                                           ('half_even', 'floor')])
def test_second_rounding_against_float64_reference(rounding, mode):
    rng = np.random.default_rng()
    stored = 8
    q_h = np.concatenate([rng.integers(-128, 128, 500),
                          np.array([-128, 127, 2, -2, 6, -6, 10, 8, -8])])
    for bit in (6, 4, 3, 2):
        shift = stored - bit
        want = []
        for q in q_h.tolist():  # one value at a time, in float64
            x = q / 2.0**shift
            if mode == 'floor':
                r = np.floor(x)
            elif rounding == 'half_up':
                r = np.floor(x + 0.5)
            else:  # ties to the even neighbour
                r = np.floor(x)
                if x - r > 0.5 or (x - r == 0.5 and r % 2 == 1):
                    r += 1
            want.append(min(max(r, -2**(bit - 1)), 2**(bit - 1) - 1))
        got = second_rounding(q_h.astype(np.int8), stored, bit, rounding,
                              mode)
        assert got.dtype == np.int8
        np.testing.assert_array_equal(
            got.astype(np.int64), np.array(want, np.int64) * 2**(8 - bit))


def test_no_stack_traces_or_local_paths(exports):
    for layout, folder in exports.items():
        for name in os.listdir(folder):
            data = open(osp.join(folder, name), 'rb').read()
            for text in (os.getcwd(), osp.dirname(torch.__file__),
                         osp.dirname(osp.dirname(folder)), 'stack_trace'):
                assert text.encode() not in data, (layout, name, text)


def copy_folder(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_failed_export_leaves_the_old_one(model, exports, tmp_path,
                                          monkeypatch):
    out = copy_folder(exports['single'], tmp_path / 'onnx')
    before = {n: open(osp.join(out, n), 'rb').read() for n in os.listdir(out)}

    def full_disk(*args):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(folder_module, '_check_rebuilt', full_disk)
    with pytest.raises(OSError, match='No space left'):
        export_to_folder(model, out, [8, 4], None, SHAPE, plain)
    after = {n: open(osp.join(out, n), 'rb').read() for n in os.listdir(out)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ['onnx']  # no staging left
    assert SwitchableSession(out).available == list(BITS) + list(SUBNETS)


def test_kill_between_renames_recovers_the_old_export(model, exports,
                                                      tmp_path, monkeypatch):
    """Without an atomic exchange the swap is two renames; a kill between
    them leaves only ``.onnx.old-*``, which the next export puts back."""
    out = str(tmp_path / 'onnx')
    copy_folder(exports['single'], tmp_path / '.onnx.old-x1')
    copy_folder(exports['single'], tmp_path / '.onnx.staging-x2')
    folder_module.check_out_dir(out)
    assert sorted(os.listdir(tmp_path)) == ['onnx']
    assert ExportFolder(out).available == list(BITS) + list(SUBNETS)
    monkeypatch.setattr(folder_module, '_exchange', lambda a, b: False)
    export_to_folder(model, out, [4], None, SHAPE, plain)
    assert sorted(os.listdir(tmp_path)) == ['onnx']
    assert ExportFolder(out).available == [4]


@pytest.mark.parametrize('name', ['../outside.onnx', '/tmp/outside.onnx',
                                  'sub/x.onnx', '..'])
def test_meta_names_outside_the_folder_refused(exports, tmp_path, name):
    out = copy_folder(exports['single'], tmp_path / 'onnx')
    outside = tmp_path / 'outside.onnx'
    outside.write_bytes(b'keep')
    path = osp.join(out, 'meta.json')
    meta = json.load(open(path))
    meta['files'][name] = meta['files'].pop('w2a2.npz')
    json.dump(meta, open(path, 'w'))
    with pytest.raises(ValueError, match='not a plain file name'):
        SwitchableSession(out)
    with pytest.raises(FileExistsError):
        folder_module.check_out_dir(out)
    assert outside.read_bytes() == b'keep'


def test_another_models_folder_refused_unless_overwrite(exports, tmp_path):
    from conftest import TinyCNN
    out = copy_folder(exports['single'], tmp_path / 'onnx')
    torch.manual_seed(1)
    other = TinyCNN(width=4)
    quantize_model(other, bits=list(BITS))
    calibrate(other, (4, 3, 6, 6))
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match='export of another model'):
        export_to_folder(other, out, [8, 4], None, SHAPE, plain)
    assert sorted(os.listdir(out)) == before
    export_to_folder(other, out, [8, 4], None, SHAPE, plain, overwrite=True)
    assert ExportFolder(out).available == [8, 4]


@pytest.mark.parametrize('damage', ['replaced', 'truncated', 'missing'])
def test_damaged_files_refused_when_opened(exports, tmp_path, damage):
    out = copy_folder(exports['single'], tmp_path / 'onnx')
    target = osp.join(out, 'model.onnx' if damage != 'truncated'
                      else 'w2a2.npz')
    if damage == 'replaced':  # another model's file in its place
        other = onnx.load(osp.join(exports['per_bit'], 'w4a4.onnx'))
        onnx.save(other, target)
        match = 'does not match the SHA-256'
    elif damage == 'truncated':
        data = open(target, 'rb').read()
        open(target, 'wb').write(data[:len(data) // 2])
        match = 'does not match the SHA-256'
    else:
        os.remove(target)
        match = 'is missing'
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        SwitchableSession(out)
    assert osp.basename(target) in str(e.value)


def test_runtime_runs_where_torch_cannot_be_imported(exports):
    """The deploy host side imports numpy, onnx and onnxruntime only."""
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'mmengine', 'mmdet', 'mmseg',
                                  'mmpretrain', 'mmcv', 'mmdrq'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from mmdrq_runtime import SwitchableSession
session = SwitchableSession({exports['single']!r})
x = np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype('f4')
print(sorted(m for m in sys.modules if m.startswith('torch')))
print([session.set_bits(k).run(x)[0].shape for k in session.available])
"""
    result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == '[]'
    assert lines[1] == str([(3, 4)] * (len(BITS) + len(SUBNETS)))


def test_fixed_sizes_checked_against_the_test_batch():
    """A graph whose sizes the model fixed: another height or width is an
    error that says how to export again; a fixed batch of 1 runs image by
    image."""
    from mmdrq.deploy.loop import check_input_shape
    meta = dict(input_dims=[None, 3, 224, 224])
    with pytest.raises(ValueError, match='--input-shape 1 3 16 16'):
        check_input_shape(meta, (2, 3, 16, 16))
    assert check_input_shape(meta, (2, 3, 224, 224)) is False
    assert check_input_shape(dict(input_dims=[1, 3, None, None]),
                             (2, 3, 16, 16)) is True


def test_calibrated_int8_ends_serve_every_setting(model, tmp_path):
    """--residual-qdq calibrated --fp-layers int8 in one folder: every
    setting's session (from the rewritten stored graph) equals the one
    from its own file, also where a setting's values differ from the
    stored graph's (the stem's bias: int32 per bit)."""
    calibration = [torch.randn(4, 3, 6, 6,
                               generator=torch.Generator().manual_seed(5))]
    folders = {}
    for layout in ('single', 'per_bit'):
        folders[layout] = str(tmp_path / layout)
        export_to_folder(model, folders[layout], BITS, SUBNETS, SHAPE, plain,
                         layout=layout, residual_qdq='calibrated',
                         calibration=calibration, fp_layers='int8')
    single, own = (SwitchableSession(folders[k], kernels='integer')
                   for k in ('single', 'per_bit'))
    x = torch.randn(2, 3, 6, 6).numpy()
    for key in single.available:
        np.testing.assert_array_equal(single.set_bits(key).run(x)[0],
                                      own.set_bits(key).run(x)[0])


def test_export_tool_refuses_a_size_below_one_first(tmp_path, monkeypatch,
                                                    capsys):
    import runpy
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    monkeypatch.setattr(sys, 'argv', [
        'export_onnx.py', 'no_config.py', 'no.pth', '--out-dir',
        str(tmp_path / 'out'), '--input-shape', '1', '3', '0', '16'])
    with pytest.raises(SystemExit):
        runpy.run_path(osp.join(root, 'tools', 'export_onnx.py'),
                       run_name='__main__')
    assert '--input-shape takes N C H W (or N T for a language model), '\
        'sizes >= 1, got [1, 3, 0, 16]' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_onnxruntime_loop_settings():
    from mmdrq.deploy.loop import settings_to_run
    available = [8, 4, 'mixed']
    assert [s for _, s in settings_to_run(available, 'all', None, 'f')] == \
        [8, 4, 'mixed']
    assert [s for _, s in settings_to_run(available, 4, None, 'f')] == [4]
    assert [s for _, s in settings_to_run(available, [8], ['mixed'],
                                          'f')] == [8, 'mixed']
    for bad in ('84', True, 4.0):
        with pytest.raises(ValueError, match="test_cfg.bits must be 'all', "
                           f'a bit or a list of bits, got {bad!r}'):
            settings_to_run(available, bad, None, 'f')
    with pytest.raises(ValueError, match="6 is not exported in 'f'"):
        settings_to_run(available, [6], None, 'f')
