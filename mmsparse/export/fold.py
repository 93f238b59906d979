"""Fold a compressed model into a plain mmdet checkpoint and config, and verify patterns.

Every compressed layer implements the protocol of :mod:`mmsparse.maxq.layers` (and CGMQ, SA++):
it subclasses ``nn.Conv2d`` / ``nn.Linear`` and provides ``fold_info() -> dict(method=..., pattern=...,
[reason=...])`` and ``folded_weight() -> Tensor``. Folding keeps, for each such layer, only ``weight``
(its folded weight, exact zeros) and ``bias``; every other parameter or buffer under the layer (mask,
gates, ranges, logits, support, quantizer sub-modules ...) is dropped. Nothing here is method-specific
except the checks of the recorded patterns (below).

Folded checkpoint layout (plain Python types and tensors only, so stock mmengine loads it with torch's
``weights_only=True``)::

    {'state_dict': {<mmdet key>: Tensor, ...},
     'meta': {'dataset_meta': ...,                      # copied from the source when plain
              'mmsparse_fold': {'format': 1, 'mmsparse_version': '0.1.0',
                                'source_checkpoint': 'epoch_12.pth', 'source_sha256': '…',
                                'layers': {<layer>: {'method': 'maxq', 'pattern': '1:16'}, ...}}}}

A quantized layer (CGMQ, pattern ``'w<bits_w>a<bits_a>'``) also records its quantization grid in
its ``layers`` entry (the layer's ``fold_info``): ``weight_scale`` (per output channel), ``act_scale``
and ``act_signed``, so the folded weights can be checked to lie on their ``bits_w``-bit grid
(:func:`quant_grid_violations`) and the input quantization can be rebuilt outside mmsparse.
"""
import copy
import hashlib
import inspect
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor, nn

from ..core.finite import NonFinite, check_finite, find_nonfinite
from ..core.report import LayerStat, Violation, format_report, verify_state_dict
from ..utils import atomic_write
from ..version import __version__

FOLD_META_KEY = 'mmsparse_fold'
FOLD_FORMAT = 1
_PLAIN_SCALARS = (str, int, float, bool, type(None))


class PatternViolationError(ValueError):
    """Folded weights break the pattern their layer declares (or hold NaN/inf)."""

    def __init__(self, violations: List[Union[Violation, 'GridViolation', NonFinite]]) -> None:
        self.violations = violations
        lines = '\n  '.join(str(v) for v in violations[:20])
        more = f'\n  ... and {len(violations) - 20} more' if len(violations) > 20 else ''
        nonfinite = sum(isinstance(v, NonFinite) for v in violations)
        broken = len(violations) - nonfinite
        what = ('block(s)' if all(not isinstance(v, GridViolation) for v in violations)
                else 'block(s) / quantized layer(s)')
        heads = ([f'{nonfinite} tensor(s) hold NaN/inf'] if nonfinite else []) + (
            [f'{broken} {what} break their declared pattern'] if broken else [])
        super().__init__(f'{"; ".join(heads)}:\n  {lines}{more}')


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def compressed_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every module implementing the fold protocol."""
    return {name: m for name, m in model.named_modules()
            if callable(getattr(m, 'fold_info', None)) and callable(getattr(m, 'folded_weight', None))}


def _plain(obj: Any) -> bool:
    if isinstance(obj, _PLAIN_SCALARS):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, _PLAIN_SCALARS) and _plain(v) for k, v in obj.items())
    return False


def fold_layers_info(model: nn.Module) -> Dict[str, dict]:
    """``{layer: fold_info()}`` for every compressed layer, checked to be plain Python types."""
    info = {}
    for name, module in compressed_layers(model).items():
        entry = dict(module.fold_info())
        if 'method' not in entry or 'pattern' not in entry:
            raise ValueError(f'{name}: fold_info() must give method and pattern, got {entry}')
        if not _plain(entry):
            raise TypeError(f'{name}: fold_info() must hold plain Python values, got {entry}')
        info[name] = entry
    return info


@torch.no_grad()
def fold_state_dict(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, dict]]:
    """The plain state dict of ``model`` with every compressed layer folded.

    Returns:
        tuple: ``(state_dict, layers)``: the folded state dict (mmdet key names, contiguous CPU
        tensors) and ``{layer: fold_info()}``.
    """
    layers = compressed_layers(model)
    info = fold_layers_info(model)
    state = model.state_dict()
    folded: Dict[str, Tensor] = {}
    prefixes = tuple(f'{name}.' for name in layers)
    for key, value in state.items():
        owner = next((p for p in prefixes if key.startswith(p)), None)
        if owner is not None and key[len(owner):] not in ('weight', 'bias'):
            continue  # mask, gates, ranges, logits, support, sub-module state ...
        folded[key] = value.detach().cpu().clone().contiguous()
    for name, module in layers.items():
        weight = module.folded_weight().detach().cpu().contiguous()
        key = f'{name}.weight'
        if key not in folded or weight.shape != folded[key].shape:
            raise ValueError(f'{name}: folded_weight() of shape {tuple(weight.shape)} does not match '
                             f'the layer weight {key!r}')
        weight = weight.to(folded[key].dtype)
        # exact +0.0 where the mask is 0 (W * 0 gives -0.0 for negative W)
        folded[key] = torch.where(weight == 0, torch.zeros_like(weight), weight)
    return folded, info


def declared_patterns(layers: Mapping[str, dict]) -> Dict[str, str]:
    """``{layer: pattern}`` from fold info / checkpoint meta (dense layers included as 'dense')."""
    return {name: entry['pattern'] for name, entry in layers.items()}


def verify_folded(state_dict: Mapping[str, Tensor], patterns: Mapping[str, str]) -> None:
    """Raise :class:`PatternViolationError` if any layer breaks its declared (sparsity) pattern."""
    violations = verify_state_dict(state_dict, dict(patterns))
    if violations:
        raise PatternViolationError(violations)


# ------------------------------------------------------------------ quantization grids (CGMQ) ---

_QUANT_PATTERN = re.compile(r'w(\d+)a(\d+)')
_GRID_CHECK_MAX_BITS = 16  # 32-bit codes exceed float32's 24-bit significand: no grid to check


@dataclass
class GridViolation:
    """A quantized layer whose folded weights are not on its declared ``bits``-bit grid."""

    layer: str
    bits: int
    off_grid: int        # weights with |w / scale - round(w / scale)| above the tolerance
    max_offset: float    # the largest such distance, in units of the scale
    out_of_range: int    # codes outside [-(2^(bits-1) - 1), 2^(bits-1) - 1]

    def __str__(self) -> str:
        return (f'{self.layer}: {self.off_grid} weight(s) off the {self.bits}-bit grid (up to '
                f'{self.max_offset:.3g} of a step), {self.out_of_range} code(s) out of range')


def quant_grid_violations(state_dict: Mapping[str, Tensor],
                          layers: Mapping[str, dict]) -> List[GridViolation]:
    """Check that every quantized layer's weights lie on their declared grid.

    A layer declared ``'w<b>a<b_a>'`` must hold ``weight = code · weight_scale`` (per output
    channel) with integer codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. The tolerance on
    integrality, ``1e-3 + 2^-20 · code_max`` of a step, covers float32 rounding of the quantized
    values (measured: 2e-5 at 8 bits, 9e-3 at 16 bits) and is far below the up to 0.5 of an
    unquantized weight. 32-bit layers are not checked (their codes do not fit float32).

    Raises:
        ValueError: a quantized layer has no ``weight_scale`` (meta written before it existed, or a
            hand-written pattern): its grid cannot be checked.
        KeyError: a declared layer has no weight in the state dict.
    """
    violations = []
    for name, entry in layers.items():
        match = _QUANT_PATTERN.fullmatch(str(entry.get('pattern', '')))
        if match is None:
            continue
        bits = int(match.group(1))
        if bits > _GRID_CHECK_MAX_BITS:
            continue
        if 'weight_scale' not in entry:
            raise ValueError(f'{name}: pattern {entry["pattern"]!r} needs weight_scale in the fold '
                             f'meta to be verified')
        key = f'{name}.weight'
        if key not in state_dict:
            raise KeyError(f'pattern declared for {name!r} but {key!r} is not in the checkpoint')
        weight = state_dict[key].detach().double()
        scale = torch.tensor(entry['weight_scale'], dtype=torch.float64)
        codes = weight / scale.view(-1, *([1] * (weight.dim() - 1)))
        offset = (codes - codes.round()).abs()
        code_max = 2 ** (bits - 1) - 1
        off = offset > 1e-3 + 2.0 ** -20 * code_max
        out = codes.round().abs() > code_max
        if off.any() or out.any():
            violations.append(GridViolation(name, bits, int(off.sum()), float(offset.max()),
                                            int(out.sum())))
    return violations


def state_dict_report(state_dict: Mapping[str, Tensor], layers: Mapping[str, dict]) -> List[LayerStat]:
    """Sparsity report rows for a (folded) state dict: declared layers plus every other 2-D/4-D weight."""
    from ..core.report import _stat  # shared row builder
    rows = []
    declared = {f'{name}.weight': (name, entry) for name, entry in layers.items()}
    for key, value in state_dict.items():
        if not key.endswith('.weight') or not isinstance(value, Tensor) or value.dim() not in (2, 4):
            continue
        if key in declared:
            name, entry = declared[key]
            rows.append(_stat(name, value, entry['pattern'], entry.get('reason')))
        else:
            rows.append(_stat(key[:-len('.weight')], value, 'dense', 'not converted'))
    return rows


# --------------------------------------------------------------------------------------- config ---

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


# ----------------------------------------------------------------------------------------- fold ---

@dataclass
class FoldResult:
    """What :func:`fold_checkpoint` wrote and found."""

    checkpoint: Optional[str]
    config: Optional[str]
    layers: Dict[str, dict]
    report: List[LayerStat] = field(default_factory=list)
    source_sha256: str = ''


def build_model(config: Union[str, Config], cfg_options: Optional[dict] = None) -> nn.Module:
    """Build the (compressed) model of an mmsparse config, registries initialised, in eval mode."""
    import mmsparse  # noqa: F401  registers mmsparse's layers
    from mmdet.utils import register_all_modules
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    register_all_modules(init_default_scope=False)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    return model.eval()


def load_source_checkpoint(model: nn.Module, path: str) -> dict:
    """Load ``path`` (through mmengine's loader, hence mmsparse's safe loader) into ``model``.

    Raises:
        RuntimeError: the checkpoint misses keys of the model (e.g. a compressed layer's mask: folding
            it with a default mask would silently change the weights).
    """
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else checkpoint
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise RuntimeError(f'{path} misses {len(result.missing_keys)} key(s) of the model, e.g. '
                           f'{result.missing_keys[:5]}; refusing to fold')
    if result.unexpected_keys:
        from mmengine.logging import print_log
        print_log(f'{path}: ignored {len(result.unexpected_keys)} unexpected key(s), e.g. '
                  f'{result.unexpected_keys[:5]}', logger='current', level=30)
    return checkpoint


def fold_model(model: nn.Module, source_meta: Optional[dict] = None, source_sha256: str = '',
               source_name: str = '') -> Tuple[dict, Dict[str, dict]]:
    """Fold ``model`` into a verified plain checkpoint dict (see module docstring).

    Raises:
        FloatingPointError: a parameter or buffer of ``model`` holds NaN/inf (named, with the count
            of bad values; e.g. a checkpoint of a diverged run).
        PatternViolationError: a folded layer breaks its declared pattern.
    """
    check_finite('fold', model, advice='refusing to fold a model with NaN/inf (a diverged run?): '
                 'fold a checkpoint from before the divergence')
    state, layers = fold_state_dict(model)
    verify_folded(state, declared_patterns(layers))
    grid = quant_grid_violations(state, layers)
    if grid:
        raise PatternViolationError(grid)
    meta: Dict[str, Any] = {}
    if source_meta:
        for key in ('dataset_meta', 'mmdet_version', 'mmengine_version', 'experiment_name'):
            if key in source_meta and _plain(source_meta[key]):
                meta[key] = copy.deepcopy(source_meta[key])
    meta[FOLD_META_KEY] = dict(format=FOLD_FORMAT, mmsparse_version=__version__,
                               source_checkpoint=source_name, source_sha256=source_sha256,
                               layers=layers)
    return dict(state_dict=state, meta=meta), layers


def fold_checkpoint(config: Union[str, Config], checkpoint: str, out_dir: Optional[str] = None,
                    cfg_options: Optional[dict] = None, out_name: Optional[str] = None) -> FoldResult:
    """Fold ``checkpoint`` of the mmsparse ``config`` into a plain mmdet checkpoint and config.

    Args:
        config (str | Config): The mmsparse config the checkpoint was trained with.
        checkpoint (str): The compressed checkpoint.
        out_dir (str, optional): Where to write ``<name>.pth`` and ``<name>.py``; ``None`` writes
            nothing (verify and report only). Defaults to None.
        cfg_options (dict, optional): Overrides merged into the config. Defaults to None.
        out_name (str, optional): Stem of the written files. Defaults to the checkpoint's stem plus
            ``_folded``.

    Raises:
        FloatingPointError: the checkpoint holds NaN/inf (:func:`fold_model`); nothing is written.
        PatternViolationError: a folded layer breaks its declared pattern; nothing is written.
    """
    cfg = Config.fromfile(config) if isinstance(config, str) else copy.deepcopy(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    model = build_model(cfg)
    source = load_source_checkpoint(model, checkpoint)
    model.eval()
    digest = sha256_file(checkpoint)
    folded, layers = fold_model(model, source.get('meta') if isinstance(source, dict) else None,
                                digest, osp.basename(checkpoint))
    plain = plain_config(cfg)  # fails before anything is written
    report = state_dict_report(folded['state_dict'], layers)
    result = FoldResult(None, None, layers, report, digest)
    if out_dir is not None:
        stem = out_name or osp.splitext(osp.basename(checkpoint))[0] + '_folded'
        ckpt_path = osp.join(out_dir, stem + '.pth')
        cfg_path = osp.join(out_dir, stem + '.py')
        atomic_write(ckpt_path, lambda tmp: torch.save(folded, tmp))
        atomic_write(cfg_path, lambda tmp: plain.dump(tmp))
        result.checkpoint, result.config = ckpt_path, cfg_path
    return result


def load_plain_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no mmsparse allow-list: what stock tools see)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def verify_checkpoint(path: str, patterns: Optional[Mapping[str, str]] = None
                      ) -> Tuple[List[Union[NonFinite, Violation, GridViolation]], List[LayerStat]]:
    """Check a checkpoint against ``{layer: pattern}`` (default: the patterns in its fold meta).

    Checkpoints still carrying masks are checked on their stored ``weight`` tensors, i.e. as if they
    were folded: verify the output of :func:`fold_checkpoint`, or give explicit patterns.

    Quantized layers (``'w4a8'``-style patterns) are checked against the grid recorded in the
    fold meta (:func:`quant_grid_violations`). Every floating-point tensor is checked for NaN/inf;
    those holding some come first in the violations, as :class:`~mmsparse.core.NonFinite`.

    Returns:
        tuple: ``(violations, report rows)``.

    Raises:
        ValueError: no patterns given and the checkpoint has no mmsparse fold meta, or a quantized
            layer's pattern comes without its ``weight_scale``.
    """
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if patterns is None:
        meta = (checkpoint.get('meta') or {}).get(FOLD_META_KEY) if isinstance(checkpoint, dict) else None
        if not meta:
            raise ValueError(f'{path} has no {FOLD_META_KEY!r} meta: give the patterns to verify')
        layers = meta['layers']
    else:
        layers = {name: dict(pattern=p) for name, p in patterns.items()}
    violations = find_nonfinite(state)
    violations += verify_state_dict(state, declared_patterns(layers))
    violations += quant_grid_violations(state, layers)
    return violations, state_dict_report(state, layers)


__all__ = [
    'FOLD_META_KEY', 'FoldResult', 'GridViolation', 'PatternViolationError', 'build_model',
    'compressed_layers', 'declared_patterns', 'fold_checkpoint', 'fold_layers_info', 'fold_model',
    'fold_state_dict', 'format_report', 'load_plain_checkpoint', 'load_source_checkpoint',
    'mmsparse_type_names', 'plain_config', 'quant_grid_violations',
    'sha256_file', 'state_dict_report', 'verify_checkpoint', 'verify_folded'
]
