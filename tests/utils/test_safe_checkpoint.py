"""Checkpoints given as URLs (http(s)://, and torchvision:// or
open-mmlab://, which MMEngine resolves to them) are read with
``weights_only=True`` like local files: a pickled payload is refused, also
from torch.hub's cache, and never runs (issue 25)."""
import functools
import http.server
import os
import threading

import pytest
import torch
from mmengine.runner import CheckpointLoader

import mmdrq  # noqa: F401 (installs the safe loaders)
from mmdrq.utils.safe_checkpoint import UnsafeCheckpointError


class _Payload:
    """Unpickling it would create a folder: code run by the load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker, )


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server of ``tmp_path / 'www'``, torch.hub's cache in
    ``tmp_path / 'hub'``."""
    www = tmp_path / 'www'
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    try:
        yield www, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        torch.hub.set_dir(hub)
        server.shutdown()


def test_url_checkpoint_with_code_is_refused(served, tmp_path, monkeypatch):
    www, url = served
    marker = tmp_path / 'ran'
    torch.save(dict(state_dict={'w': torch.ones(2)},
                    meta=dict(note=_Payload(marker))), www / 'evil.pth')
    torch.save(dict(state_dict={'w': torch.ones(2)}), www / 'plain.pth')
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    for attempt in ('download', 'cached'):
        with pytest.raises(UnsafeCheckpointError, match='evil.pth'):
            CheckpointLoader.load_checkpoint(f'{url}/evil.pth')
        assert not marker.exists(), attempt
    loaded = CheckpointLoader.load_checkpoint(f'{url}/plain.pth')
    assert torch.equal(loaded['state_dict']['w'], torch.ones(2))


class _PlainPickler:
    """``torch.save``'s pickle module as MMEngine has it without mmdrq:
    HistoryBuffer pickled with its table of statistics methods, which
    reads ``getattr(HistoryBuffer, 'min')`` and so on."""
    import pickle as _pickle

    class Pickler(_pickle.Pickler):
        dispatch_table = {k: v for k, v in
                          __import__('copyreg').dispatch_table.items()
                          if k.__name__ != 'HistoryBuffer'}

    dump = staticmethod(_pickle.dump)


class _Getattr:
    """Unpickles as ``getattr(owner, name)``."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_a_checkpoint_mmengine_wrote_without_mmdrq_loads(tmp_path):
    """What mmpretrain's, mmdet's and mmseg's own tools/train.py write: a
    message hub whose HistoryBuffers hold ``getattr(HistoryBuffer, stat)``;
    it loads, with the statistics, through MMEngine's loader."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    buffer = HistoryBuffer()
    for value in (1.0, 2.0, 4.0):
        buffer.update(value)
    path = str(tmp_path / 'fp32.pth')
    torch.save(dict(state_dict={'w': torch.arange(3.)},
                    message_hub=dict(log_scalars={'loss': buffer}),
                    meta=dict(seed=np.int64(3))), path,
               pickle_module=_PlainPickler)
    import zipfile
    with zipfile.ZipFile(path) as archive:  # the case being tested
        pickled = archive.read(next(n for n in archive.namelist()
                                    if n.endswith('data.pkl')))
    assert b'getattr' in pickled and b'statistics_methods' in pickled
    loaded = CheckpointLoader.load_checkpoint(path)
    assert torch.equal(loaded['state_dict']['w'], torch.arange(3.))
    restored = loaded['message_hub']['log_scalars']['loss']
    assert restored.mean() == buffer.mean() and restored.current() == 4.0


@pytest.mark.parametrize('owner,name', [
    ('HistoryBuffer', 'update'), ('HistoryBuffer', '__init__'),
    ('ndarray', 'tofile'), ('HistoryBuffer', 7)])
def test_getattr_other_than_a_statistic_is_refused(tmp_path, owner, name):
    import pickle

    import numpy as np
    from mmengine.logging import HistoryBuffer
    owner = dict(HistoryBuffer=HistoryBuffer, ndarray=np.ndarray)[owner]
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict={}, meta=_Getattr(owner, name)), path)
    with pytest.raises(pickle.UnpicklingError,
                       match="only HistoryBuffer's statistics"):
        CheckpointLoader.load_checkpoint(path)
