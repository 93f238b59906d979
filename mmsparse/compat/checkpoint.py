"""Safe checkpoint loading for mmengine 0.10.7 under torch >= 2.6; checkpoints of another method.

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
A file whose pickle references a global of :data:`DANGEROUS_GLOBALS` (``os.system``, ``subprocess``,
``builtins.eval``, ...) is refused whatever the setting, and its message offers no override.

:func:`check_compression_matches` refuses a checkpoint whose compressed layers differ from the
model's (e.g. an SA++ checkpoint resumed with a MaxQ config) before MMEngine drops the difference
silently or fails inside the optimizer's parameter groups.
"""
import _compat_pickle
import collections
import fnmatch
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

TRUST_ENV = 'MMSPARSE_TRUSTED_CHECKPOINTS'
_BUFFER_TAG = '__mmsparse_history_buffer__'

#: ``module.name`` patterns (fnmatch) of globals that spawn processes, execute code or reach the
#: system when a pickle calls them. A checkpoint referencing one is refused with no override.
DANGEROUS_GLOBALS = (
    'os.*', 'posix.*', 'nt.*', 'subprocess.*', '_posixsubprocess.*', 'pty.*', 'multiprocessing.*',
    'builtins.eval', 'builtins.exec', 'builtins.compile', 'builtins.__import__', 'builtins.open',
    'builtins.breakpoint', 'builtins.setattr', 'builtins.delattr', 'builtins.globals',
    'importlib.*', 'runpy.*', 'code.*', 'codeop.*', 'ctypes.*', 'marshal.*', 'pickle.*',
    '_pickle.*', 'types.*', 'sys.*', 'shutil.*', 'socket.*', 'webbrowser.*', 'timeit.*',
    'cProfile.*', 'profile.*', 'pdb.*', 'bdb.*', 'torch.load', 'torch.serialization.*', 'torch.hub.*',
    'torch.jit.*')
#: pickles at the start of a legacy (non-zip) torch file: magic, protocol, sys info, data, keys
_LEGACY_PICKLES = 5


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list and its path is not trusted."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's compressed layers differ from the model's (another compression method)."""


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


# -- inspecting a pickle without running it -------------------------------------------------------
class _Stub:
    """Stands in for every global while a pickle is inspected; calls, state, items are ignored."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, *args, **kwargs) -> '_Stub':
        return _Stub()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        """Ignored (``APPEND`` on a stub)."""

    def extend(self, values: Any) -> None:
        """Ignored (``APPENDS`` on a stub)."""


class _GlobalsRecorder(pickle.Unpickler):
    """Records the globals a pickle references; never imports a module nor calls a global."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.names: List[str] = []

    def find_class(self, module: str, name: str) -> type:  # noqa: D102
        # the Python 2 names that pickle's own find_class maps (fix_imports), e.g. __builtin__.eval
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        self.names.append(f'{module}.{name}')
        return _Stub

    def persistent_load(self, pid: Any) -> _Stub:  # noqa: D102
        return _Stub()


def _record(file: IO[bytes]) -> List[str]:
    recorder = _GlobalsRecorder(file)
    recorder.load()
    return recorder.names


def referenced_globals(filename: str) -> List[str]:
    """Every global (``module.name``) the pickles of a torch checkpoint file reference.

    Nothing is imported or called: each global is replaced by an inert stub while the pickles are
    read. Raises whatever the pickle module raises for a file it cannot read.
    """
    names: List[str] = []
    if zipfile.is_zipfile(filename):
        with zipfile.ZipFile(filename) as archive:
            for member in archive.namelist():
                if member.endswith('.pkl'):
                    with archive.open(member) as file:
                        names += _record(file)
        return names
    with open(filename, 'rb') as file:
        for _ in range(_LEGACY_PICKLES):
            try:
                names += _record(file)
            except EOFError:
                break
    return names


def _never_load_reason(filename: str) -> Optional[str]:
    """Why the file must not be unpickled, whatever the settings; ``None`` if no reason is known."""
    try:
        names = referenced_globals(filename)
    except Exception as err:  # noqa: BLE001  any failure leaves the file uninspected
        return (f'it could not be inspected for globals that run code ({type(err).__name__}: '
                f'{err}), so it is not unpickled')
    dangerous = sorted({n for n in names
                        if any(fnmatch.fnmatchcase(n, p) for p in DANGEROUS_GLOBALS)})
    if not dangerous:
        return None
    return (f'its pickle references {", ".join(dangerous)}, which can run commands or code (or '
            'change files) while the file is unpickled. A checkpoint never needs this, and no '
            'setting of mmsparse loads such a file; take the weights from their original source')


def safe_load_from_local(filename: str, map_location: Optional[Union[str, Callable]] = None):
    """Load a local checkpoint with ``weights_only=True`` and mmsparse's allow-list.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file references objects outside the allow-list and its path is
            not listed in ``MMSPARSE_TRUSTED_CHECKPOINTS``, or it references a global of
            :data:`DANGEROUS_GLOBALS` (listed or not).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename!r} does not exist')
    if _trusted(filename):
        reason = _never_load_reason(filename)
        if reason is not None:
            raise UnsafeCheckpointError(f'refused to load {filename!r} although {TRUST_ENV} lists '
                                        f'it: {reason}')
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            checkpoint = torch.load(filename, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as err:
        raise RuntimeError(f'checkpoint {filename!r} is corrupted or truncated ({err})') from err
    except pickle.UnpicklingError as err:
        reason = _never_load_reason(filename)
        if reason is not None:
            raise UnsafeCheckpointError(f'refused to load {filename!r}: {reason}') from err
        found = re.search(r'GLOBAL ([\w.]+)', str(err))
        raise UnsafeCheckpointError(
            f'refused to load {filename!r}: it references '
            f'{found.group(1) if found else "objects"}, outside mmsparse\'s allow-list '
            '(checkpoints written without SafeCheckpointHook carry such objects). If you trust '
            f'this file, add its path (or its directory) to the environment variable {TRUST_ENV}.'
        ) from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('message_hub'), dict):
        _restore_buffers(checkpoint['message_hub'])
    return checkpoint


def install_safe_checkpoint_loading() -> None:
    """Route mmengine's local-file checkpoint loading through :func:`safe_load_from_local`."""
    CheckpointLoader.register_scheme(prefixes='', loader=safe_load_from_local, force=True)


# -- checkpoints of another compression method ----------------------------------------------------
def compression_layer_types() -> Dict[type, Tuple[str, ...]]:
    """Registered layer classes declaring ``compression_state`` (the parameters and persistent
    buffers they add to the plain torch layer), with those names."""
    return {cls: tuple(cls.compression_state) for cls in MODELS.module_dict.values()
            if isinstance(cls, type) and getattr(cls, 'compression_state', None)}


def _torch_base(module: nn.Module) -> type:
    """The first ``torch.nn`` class of the module's type (``nn.Conv2d`` for ``MaxQConv2d``)."""
    return next((c for c in type(module).__mro__ if c.__module__.startswith('torch.nn')), nn.Module)


def _saved_layer_type(module: nn.Module, saved: frozenset,
                      classes: Dict[type, Tuple[str, ...]]) -> str:
    """The registered layer classes whose compression state is exactly ``saved``."""
    base = _torch_base(module)
    names = sorted(c.__name__ for c, state in classes.items()
                   if frozenset(state) == saved and issubclass(c, base))
    return '/'.join(names) or f'compressed (with {", ".join(sorted(saved))})'


def check_compression_matches(model: nn.Module, state_dict: Mapping[str, Any], filename: str,
                              resume: bool) -> None:
    """Refuse a checkpoint whose compressed layers differ from the model's.

    A layer's compression state is what its class lists in ``compression_state`` (MaxQ's ``mask``,
    SA++'s ``support`` and ``block_logits``, CGMQ's ranges and gates, ...). MMEngine loads
    checkpoints non-strictly, so a checkpoint of another method would lose that state silently
    (``load_from``) or fail inside the optimizer's parameter groups (resume). Every layer whose
    ``weight`` the checkpoint holds must carry the same compression state in both; ``load_from`` may
    also start a compressed layer from a plain one (fine-tuning from dense weights).

    Args:
        model (nn.Module): The model, unwrapped (no DDP).
        state_dict (Mapping): The checkpoint's state dict, keys as the model names them.
        filename (str): The checkpoint's path, for the message.
        resume (bool): Whether the run resumes from the checkpoint (else it only loads weights).

    Raises:
        CheckpointMismatchError: naming the checkpoint's and the model's layer types and a key.
    """
    classes = compression_layer_types()
    names = sorted({name for state in classes.values() for name in state})
    own = set(model.state_dict(keep_vars=True))
    differ = []
    for prefix, module in model.named_modules():
        if f'{prefix}.weight' not in state_dict:
            continue
        saved = frozenset(n for n in names if f'{prefix}.{n}' in state_dict)
        built = frozenset(n for n in names if f'{prefix}.{n}' in own)
        if saved != built and (saved or resume):
            differ.append((prefix, module, saved, built))
    if not differ:
        return
    # the message shows the most telling layer: compressed on both sides, else in the checkpoint
    prefix, module, saved, built = min(differ, key=lambda d: (not (d[2] and d[3]), not d[2]))
    if saved:
        keys = ', '.join(f'{prefix}.{n}' for n in sorted(saved)[:2])
        was = (f'was trained with {_saved_layer_type(module, saved, classes)} layers (keys {keys}, '
               '...)')
    else:
        was = f'holds plain layers (no compression state for {prefix})'
    built_type = type(module).__name__
    if built - saved:
        builds = (f'{built_type} layers ({prefix}.{sorted(built - saved)[0]} missing from the '
                  'checkpoint)')
    elif built:
        builds = f'{built_type} layers (no place for {prefix}.{sorted(saved - built)[0]})'
    elif hasattr(module, 'compression_state'):
        builds = f'{built_type} layers (dense here: no place for {prefix}.{sorted(saved)[0]})'
    else:
        builds = f'plain {built_type} layers (no place for {prefix}.{sorted(saved)[0]})'
    if not saved:
        advice = ('resume needs the same method; to start compressed training from these plain '
                  'weights, use load_from instead of --resume')
    elif resume:
        advice = ('resume needs the same method; to fine-tune from it with another method, fold '
                  'it first (tools/fold.py) and use load_from')
    else:
        advice = ('load_from takes plain weights or a checkpoint of the same method; to fine-tune '
                  'from it with another method, fold it first (tools/fold.py) and load the folded '
                  'checkpoint')
    raise CheckpointMismatchError(
        f'checkpoint {filename} {was} but the config builds {builds}; {len(differ)} layers differ; '
        f'{advice}')
