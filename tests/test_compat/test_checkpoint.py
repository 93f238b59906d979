"""Safe checkpoint loading: mmsparse's checkpoints load with weights_only=True; others are refused."""
import builtins
import collections
import datetime
import importlib
import os
import pickle
import pty
import runpy
import subprocess

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer

from mmsparse.compat import (TRUST_ENV, UnsafeCheckpointError, referenced_globals,
                             safe_load_from_local, to_plain)
from mmsparse.compat.checkpoint import install_safe_checkpoint_loading  # noqa: F401


class Payload:
    """An arbitrary class: unpickling it runs code of the file's choosing."""

    def __init__(self, func=os.system, *args):
        self.call = (func, args or ('echo pwned',))

    def __reduce__(self):
        return self.call


def _assert_no_override(message: str) -> None:
    assert TRUST_ENV not in message and 'trust' not in message.lower(), message


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
    with pytest.raises(UnsafeCheckpointError, match='references posix.system, which can') as err:
        safe_load_from_local(path)
    _assert_no_override(str(err.value))
    assert 'pwned' not in capfd.readouterr().out


@pytest.mark.parametrize('func, args', [
    (os.popen, ('echo pwned',)), (os.execv, ('/bin/echo', ['echo', 'pwned'])),
    (os.spawnv, (os.P_WAIT, '/bin/echo', ['echo', 'pwned'])), (subprocess.call, (['true'],)),
    (builtins.eval, ('print("pwned")',)), (builtins.exec, ('print("pwned")',)),
    (builtins.compile, ('1', 'x', 'eval')), (importlib.import_module, ('antigravity',)),
    (runpy.run_path, ('/dev/null',)), (pty.spawn, ('/bin/true',))])
def test_process_spawning_and_code_executing_globals_get_no_override(tmp_path, capfd, func, args):
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(state_dict={'w': torch.ones(1)}, meta=Payload(func, *args)), path)
    name = f'{func.__module__}.{func.__qualname__}'
    with pytest.raises(UnsafeCheckpointError, match=f'references {name}, ') as err:
        safe_load_from_local(path)
    _assert_no_override(str(err.value))
    assert 'pwned' not in capfd.readouterr().out


def test_dangerous_global_behind_a_harmless_unknown_one_gets_no_override(tmp_path, capfd):
    """torch's unpickler stops at the first unknown global (HistoryBuffer): all of it is read."""
    path = str(tmp_path / 'hidden.pth')
    torch.save(dict(message_hub=_message_hub(), meta=Payload()), path)
    with pytest.raises(UnsafeCheckpointError, match='references posix.system') as err:
        safe_load_from_local(path)
    _assert_no_override(str(err.value))
    assert 'pwned' not in capfd.readouterr().out


def test_python2_names_of_a_legacy_pickle_are_mapped(tmp_path, capfd):
    path = tmp_path / 'legacy.pth'
    path.write_bytes(pickle.dumps(Payload(builtins.eval, 'print("pwned")'), protocol=2))
    assert b'c__builtin__\neval' in path.read_bytes()
    with pytest.raises(UnsafeCheckpointError, match='references builtins.eval') as err:
        safe_load_from_local(str(path))
    _assert_no_override(str(err.value))
    assert 'pwned' not in capfd.readouterr().out


def test_pickle_that_cannot_be_inspected_gets_no_override(tmp_path):
    path = tmp_path / 'odd.pth'
    path.write_bytes(b'\x80\x02cdatetime\ndatetime\n}b.')   # BUILD on a class: not a checkpoint
    with pytest.raises(UnsafeCheckpointError, match='could not be inspected') as err:
        safe_load_from_local(str(path))
    _assert_no_override(str(err.value))


def test_dangerous_file_is_refused_even_on_a_trusted_path(tmp_path, monkeypatch, capfd):
    path = str(tmp_path / 'evil.pth')
    torch.save(dict(meta=Payload()), path)
    monkeypatch.setenv(TRUST_ENV, str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match=f'although {TRUST_ENV} lists it: its pickle '
                                                    'references posix.system'):
        safe_load_from_local(path)
    assert 'pwned' not in capfd.readouterr().out


def test_harmless_unknown_global_keeps_the_override_hint(tmp_path):
    path = str(tmp_path / 'date.pth')
    torch.save(dict(meta=datetime.date(2024, 1, 1)), path)
    with pytest.raises(UnsafeCheckpointError, match=f'datetime.date, outside .*{TRUST_ENV}'):
        safe_load_from_local(path)


def test_referenced_globals_neither_imports_nor_calls(tmp_path, capfd):
    path = str(tmp_path / 'mixed.pth')
    torch.save(dict(message_hub=_message_hub(), meta=Payload()), path)
    names = referenced_globals(path)
    assert {'mmengine.logging.history_buffer.HistoryBuffer', 'builtins.getattr',
            'posix.system'} <= set(names)
    assert 'pwned' not in capfd.readouterr().out
    missing = tmp_path / 'unknown_module.pth'
    missing.write_bytes(b'\x80\x02cno_such_module_anywhere\nthing\n)R.')
    assert referenced_globals(str(missing)) == ['no_such_module_anywhere.thing']


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
