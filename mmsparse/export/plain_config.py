"""The plain mmdet config of an mmsparse experiment: no mmsparse layers, hooks, wrappers or imports.

Stock mmdet (and mmdeploy) build the folded checkpoint from this config; it is written beside the
folded checkpoint by :func:`mmsparse.export.fold_checkpoint`.
"""
import copy
import inspect
from typing import Any, List

from mmengine.config import Config


def _registries() -> list:
    import mmdet.registry as det_registry
    import mmengine.registry as engine_registry
    from mmengine.registry import Registry
    regs = []
    for module in (engine_registry, det_registry):
        regs += [v for v in vars(module).values() if isinstance(v, Registry)]
    return regs


def mmsparse_type_names() -> set:
    """Names of every registry entry implemented in an ``mmsparse`` module."""
    names = set()
    for reg in _registries():
        for name, obj in reg.module_dict.items():
            if getattr(obj, '__module__', '').split('.')[0] == 'mmsparse':
                names.add(name)
    return names


def _is_mmsparse_type(type_: Any, names: set) -> bool:
    if isinstance(type_, str):
        return type_.startswith('mmsparse.') or type_ in names
    return getattr(type_, '__module__', '').split('.')[0] == 'mmsparse'


def _strip_model(cfg: Any, names: set, path: str) -> Any:
    """Unwrap ``ConvertedModel`` and set mmsparse ``*conv_cfg`` / ``*linear_cfg`` entries to None."""
    if isinstance(cfg, dict):
        if cfg.get('type') == 'ConvertedModel' or (
                'type' in cfg and _is_mmsparse_type(cfg['type'], names) and 'rules' in cfg
                and 'model' in cfg):
            return _strip_model(cfg['model'], names, path)
        out = {}
        for key, value in cfg.items():
            if (isinstance(value, dict) and _is_mmsparse_type(value.get('type'), names)
                    and str(key).endswith(('conv_cfg', 'linear_cfg', 'fc_cfg'))):
                out[key] = None
            else:
                out[key] = _strip_model(value, names, f'{path}.{key}')
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_strip_model(v, names, f'{path}[{i}]') for i, v in enumerate(cfg))
    return cfg


def _plain_optim_wrapper(cfg: dict, names: set) -> dict:
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    if not _is_mmsparse_type(cfg.get('type', 'OptimWrapper'), names):
        return cfg
    type_ = cfg['type']
    name = type_ if isinstance(type_, str) else type_.__name__
    base = AmpOptimWrapper if 'Amp' in name else OptimWrapper
    keep = set(inspect.signature(base.__init__).parameters) - {'self', 'kwargs'}
    keep |= {'constructor', 'paramwise_cfg'}
    out = {k: v for k, v in cfg.items() if k in keep}
    out['type'] = base.__name__
    return out


def _find_mmsparse(cfg: Any, names: set, path: str, found: List[str]) -> None:
    if isinstance(cfg, dict):
        if 'type' in cfg and _is_mmsparse_type(cfg['type'], names):
            found.append(f'{path} (type={cfg["type"]!r})')
        for key, value in cfg.items():
            _find_mmsparse(value, names, f'{path}.{key}' if path else str(key), found)
    elif isinstance(cfg, (list, tuple)):
        for i, value in enumerate(cfg):
            _find_mmsparse(value, names, f'{path}[{i}]', found)


def plain_config(cfg: Config) -> Config:
    """The same experiment for stock mmdet: no mmsparse layers, hooks, optim wrappers or imports.

    * ``ConvertedModel`` is unwrapped to its inner model; ``conv_cfg`` / ``linear_cfg`` entries of
      mmsparse types become ``None``;
    * ``custom_hooks`` and ``default_hooks`` entries and a ``runner_type`` of mmsparse types are
      removed;
    * an mmsparse optimizer wrapper becomes ``OptimWrapper`` (``AmpOptimWrapper`` for AMP variants)
      with its method-specific arguments dropped;
    * ``mmsparse`` is removed from ``custom_imports``; ``load_from`` is cleared, ``resume`` off;
    * config helpers that hold mmsparse types (top-level keys that are no argument of mmengine's
      ``Runner``, e.g. ``cgmq`` of ``configs/cgmq/_base_/cgmq_converter.py``, whose values the
      config has already copied where they are used) are removed.

    Raises:
        ValueError: an mmsparse type is left anywhere else (named with its config path), because
            stock mmdet could not build it.
    """
    from mmengine.runner import Runner
    names = mmsparse_type_names()
    data = copy.deepcopy(cfg.to_dict())
    runner_keys = set(inspect.signature(Runner.__init__).parameters)
    for key in [k for k in data if k not in runner_keys]:
        helper: List[str] = []
        _find_mmsparse(data[key], names, key, helper)
        if helper:
            data.pop(key)
    if _is_mmsparse_type(data.get('runner_type'), names):
        data.pop('runner_type')
    data['model'] = _strip_model(data['model'], names, 'model')
    data['custom_hooks'] = [h for h in data.get('custom_hooks', []) or []
                            if not _is_mmsparse_type(h.get('type'), names)]
    if not data['custom_hooks']:
        data.pop('custom_hooks')
    if isinstance(data.get('default_hooks'), dict):
        data['default_hooks'] = {k: v for k, v in data['default_hooks'].items()
                                 if not (isinstance(v, dict) and _is_mmsparse_type(v.get('type'), names))}
    if isinstance(data.get('optim_wrapper'), dict):
        data['optim_wrapper'] = _plain_optim_wrapper(data['optim_wrapper'], names)
    imports = data.get('custom_imports')
    if isinstance(imports, dict):
        kept = [m for m in imports.get('imports', []) if m.split('.')[0] != 'mmsparse']
        if kept:
            data['custom_imports'] = dict(imports, imports=kept)
        else:
            data.pop('custom_imports')
    data['load_from'] = None
    data['resume'] = False
    left: List[str] = []
    _find_mmsparse(data, names, '', left)
    if left:
        raise ValueError('cannot write a plain mmdet config: mmsparse types remain at '
                         + ', '.join(left))
    return Config(data)


__all__ = ['mmsparse_type_names', 'plain_config']
