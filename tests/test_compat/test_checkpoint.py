"""Safe checkpoint loading: mmsparse's checkpoints load with weights_only=True; others are refused."""
import collections
import os

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from mmsparse.compat import TRUST_ENV, UnsafeCheckpointError, safe_load_from_local, to_plain
from mmsparse.compat.checkpoint import install_safe_checkpoint_loading  # noqa: F401


class Payload:
    """An arbitrary class: unpickling it runs code of the file's choosing."""

    def __reduce__(self):
        return (os.system, ('echo pwned',))


def _message_hub():
    buf = HistoryBuffer()
    buf.update(1.5, 2)
    buf.update(2.5)
    return dict(log_scalars={'train/loss': buf}, runtime_info={'eta': np.float64(3.0), 'iter': 4},
                resumed_keys={'eta': False})


def test_plain_checkpoint_round_trips_history_buffers(tmp_path):
    path = str(tmp_path / 'ok.pth')
    torch.save(dict(state_dict={'w': torch.ones(2)}, message_hub=to_plain(_message_hub()),
                    param_schedulers=[dict(milestones=collections.Counter({8: 1}))]), path)
    ckpt = safe_load_from_local(path)
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    np.testing.assert_array_equal(buf.data[0], [1.5, 2.5])
    np.testing.assert_array_equal(buf.data[1], [2, 1])
    assert ckpt['message_hub']['runtime_info']['eta'] == 3.0
    assert ckpt['param_schedulers'][0]['milestones'] == collections.Counter({8: 1})


def test_stock_mmengine_message_hub_is_refused_with_a_clear_message(tmp_path):
    path = str(tmp_path / 'stock.pth')
    torch.save(dict(message_hub=_message_hub()), path)
    with pytest.raises(UnsafeCheckpointError, match=f'HistoryBuffer.*{TRUST_ENV}'):
        safe_load_from_local(path)


def test_arbitrary_pickled_object_is_refused_and_never_run(tmp_path, capfd):
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict={}, meta=Payload()), path)
    with pytest.raises(UnsafeCheckpointError, match='posix.system|os.system'):
        safe_load_from_local(path)
    assert 'pwned' not in capfd.readouterr().out


def test_trusted_path_opt_in(tmp_path, monkeypatch):
    path = str(tmp_path / 'legacy.pth')
    torch.save(dict(message_hub=_message_hub()), path)
    monkeypatch.setenv(TRUST_ENV, str(tmp_path))
    assert isinstance(safe_load_from_local(path)['message_hub']['log_scalars']['train/loss'],
                      HistoryBuffer)


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        safe_load_from_local(str(tmp_path / 'nope.pth'))
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(RuntimeError, match='corrupted or truncated'):
        safe_load_from_local(str(bad))


def test_mmengine_uses_the_safe_loader(tmp_path):
    from mmengine.runner.checkpoint import _load_checkpoint
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(meta=Payload()), path)
    with pytest.raises(UnsafeCheckpointError):
        _load_checkpoint(path)
