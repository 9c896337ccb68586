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
