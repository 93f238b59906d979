"""Safe checkpoint loading for mmengine 0.10.7 under torch >= 2.6.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine's own checkpoints fail there:
the message hub pickles :class:`~mmengine.logging.HistoryBuffer` objects (numpy arrays plus bound
methods, i.e. ``builtins.getattr``), numpy scalars, and MultiStepLR keeps a ``collections.Counter``.
Rather than switching the safety off:

* :class:`SafeCheckpointHook` (in ``default_hooks`` of ``configs/_base_/default_runtime.py``) stores
  the message hub in plain types when a checkpoint is saved;
* mmengine's loader for local files is replaced, through its public
  ``CheckpointLoader.register_scheme``, by :func:`safe_load_from_local`, which keeps
  ``weights_only=True``, allow-lists only harmless data classes (``collections.Counter`` and the numpy
  pieces that rebuild numeric arrays and scalars) and turns the plain message hub back into
  ``HistoryBuffer`` objects. Anything else (``builtins.getattr``, arbitrary classes) is refused.

Trusted legacy checkpoints that carry other objects are opted in explicitly, per path, with the
environment variable ``MMSPARSE_TRUSTED_CHECKPOINTS`` (files or directories separated by ``os.pathsep``).
"""
import os
import os.path as osp
import pickle
import re
from typing import Callable, List, Optional, Union

import collections
from typing import Any

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

TRUST_ENV = 'MMSPARSE_TRUSTED_CHECKPOINTS'
_BUFFER_TAG = '__mmsparse_history_buffer__'


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list and its path is not trusted."""


def allowed_globals() -> List[Callable]:
    """The classes and functions a checkpoint may reference besides tensors and plain containers."""
    dtype_classes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32,
                                                 np.int64, np.uint8, np.bool_)}
    return [collections.Counter, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
            np.ndarray, np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


def to_plain(obj: Any) -> Any:
    """Nested containers with ``HistoryBuffer`` and numpy values turned into plain Python types."""
    if isinstance(obj, HistoryBuffer):
        log, count = obj.data
        return {_BUFFER_TAG: True, 'log_history': log.tolist(), 'count_history': count.tolist(),
                'max_length': obj.max_length}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict) and not isinstance(obj, collections.Counter):
        return type(obj)((k, to_plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    return obj


def _restore_buffers(obj: Any) -> Any:
    if isinstance(obj, dict):
        if obj.get(_BUFFER_TAG):
            return HistoryBuffer(obj['log_history'], obj['count_history'], obj['max_length'])
        for key, value in obj.items():
            obj[key] = _restore_buffers(value)
    return obj


def _trusted(filename: str) -> bool:
    real = osp.realpath(filename)
    for entry in filter(None, os.environ.get(TRUST_ENV, '').split(os.pathsep)):
        entry = osp.realpath(osp.expanduser(entry))
        if real == entry or real.startswith(entry.rstrip(os.sep) + os.sep):
            return True
    return False


def safe_load_from_local(filename: str, map_location: Optional[Union[str, Callable]] = None):
    """Load a local checkpoint with ``weights_only=True`` and mmsparse's allow-list.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file references objects outside the allow-list and its path is
            not listed in ``MMSPARSE_TRUSTED_CHECKPOINTS``.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename!r} does not exist')
    if _trusted(filename):
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise RuntimeError(f'checkpoint {filename!r} is corrupted or truncated ({err})') from err
    except pickle.UnpicklingError as err:
        found = re.search(r'GLOBAL ([\w.]+)', str(err))
        raise UnsafeCheckpointError(
            f'refused to load {filename!r}: it references '
            f'{found.group(1) if found else "objects"}, outside mmsparse\'s allow-list '
            f'(checkpoints written without SafeCheckpointHook carry such objects). If you trust this file, add its path (or its directory) to '
            f'the environment variable {TRUST_ENV}.') from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('message_hub'), dict):
        _restore_buffers(checkpoint['message_hub'])
    return checkpoint


def install_safe_checkpoint_loading() -> None:
    """Route mmengine's local-file checkpoint loading through :func:`safe_load_from_local`."""
    CheckpointLoader.register_scheme(prefixes='', loader=safe_load_from_local, force=True)
