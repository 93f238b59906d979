"""Safe checkpoint loading for mmengine 0.10.7 under torch >= 2.6.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine's own checkpoints fail there:
the message hub stores :class:`~mmengine.logging.HistoryBuffer` objects holding numpy arrays. Rather
than switching the safety off, mmsparse replaces mmengine's loader for local files (through
mmengine's public ``CheckpointLoader.register_scheme``) with one that keeps ``weights_only=True`` and
allow-lists only a few harmless data classes: ``HistoryBuffer`` and the numpy pieces needed to rebuild
plain arrays and scalars. Anything else (e.g. ``builtins.getattr`` or arbitrary classes) is refused.

Trusted legacy checkpoints that carry other objects are opted in explicitly, per path, with the
environment variable ``MMSPARSE_TRUSTED_CHECKPOINTS`` (files or directories separated by ``os.pathsep``).
"""
import os
import os.path as osp
import pickle
from typing import Callable, List, Optional, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

TRUST_ENV = 'MMSPARSE_TRUSTED_CHECKPOINTS'


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list and its path is not trusted."""


def allowed_globals() -> List[Callable]:
    """The classes and functions a checkpoint may reference besides tensors and plain containers."""
    dtype_classes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32,
                                                 np.int64, np.uint8, np.bool_)}
    return [HistoryBuffer, np.core.multiarray._reconstruct, np.core.multiarray.scalar, np.ndarray,
            np.dtype, *sorted(dtype_classes, key=lambda c: c.__name__)]


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
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f'refused to load {filename!r}: it references objects outside mmsparse\'s allow-list '
            f'({str(err).splitlines()[0]}). If you trust this file, add its path (or its directory) to '
            f'the environment variable {TRUST_ENV}.') from err


def install_safe_checkpoint_loading() -> None:
    """Route mmengine's local-file checkpoint loading through :func:`safe_load_from_local`."""
    CheckpointLoader.register_scheme(prefixes='', loader=safe_load_from_local, force=True)
