"""Small helpers shared by tools and modules."""
import os
import tempfile
from typing import Callable

from mmengine.registry import OPTIM_WRAPPERS


def amp_variant(wrapper_type: str) -> str:
    """The AMP counterpart of an optimizer-wrapper type (``X OptimWrapper`` → ``X AmpOptimWrapper``)."""
    if 'Amp' in wrapper_type:
        return wrapper_type
    amp = wrapper_type.replace('OptimWrapper', 'AmpOptimWrapper')
    if OPTIM_WRAPPERS.get(amp) is None:
        raise ValueError(f'optimizer wrapper {wrapper_type!r} has no AMP variant {amp!r}')
    return amp


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_layer_types(cfg) -> None:
    """Fail early, with the config path, on a ``conv_cfg`` whose layer type is not registered.

    mmcv's ``build_conv_layer`` reports an unknown type as "Cannot find None in registry"; this names
    the key and the type before the runner is built.
    """
    from mmengine.registry import init_default_scope
    from mmengine.registry import MODELS as ROOT_MODELS

    init_default_scope(cfg.get('default_scope', 'mmdet'))
    registry = ROOT_MODELS
    if cfg.get('default_scope'):
        import importlib
        registry = importlib.import_module(f'{cfg.default_scope}.registry').MODELS

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == 'conv_cfg' and isinstance(value, dict) and \
                        registry.get(value.get('type')) is None:
                    raise KeyError(f'{path}.{key}: unknown layer type {value.get("type")!r} (is the '
                                   "package that registers it in custom_imports?)")
                walk(value, f'{path}.{key}')
        elif isinstance(node, (list, tuple)):
            for idx, value in enumerate(node):
                walk(value, f'{path}[{idx}]')

    walk(cfg.get('model', {}), 'model')
