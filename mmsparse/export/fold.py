"""Fold a compressed model into a plain mmdet checkpoint and config.

Every compressed layer is a :class:`~mmsparse.core.CompressedLayer`: it subclasses ``nn.Conv2d`` /
``nn.Linear`` and provides ``folded_weight()`` and ``fold_spec()`` (a typed pattern). Folding keeps,
for each such layer, only ``weight`` (its folded weight, exact zeros) and ``bias``; every other
parameter or buffer under the layer (mask, gates, ranges, logits, support, quantizer sub-modules ...)
is dropped, and the folded weights are verified against their patterns before anything is written.

Folded checkpoint layout (plain Python types and tensors only, so stock mmengine loads it with torch's
``weights_only=True``)::

    {'state_dict': {<mmdet key>: Tensor, ...},
     'meta': {'dataset_meta': ...,                      # copied from the source when plain
              'mmsparse_fold': {'format': 1, 'mmsparse_version': '0.1.0',
                                'source_checkpoint': 'epoch_12.pth', 'source_sha256': '…',
                                'layers': {<layer>: {'method': 'maxq', 'pattern': '1:16'}, ...}}}}

A layer's entry is :meth:`FoldSpec.to_meta`: a quantized layer (pattern ``'w<bits_w>a<bits_a>'``)
also records its grid (``weight_scale`` per output channel, ``act_scale``, ``act_signed``), so the
folded weights can be checked on their grid and the input quantization rebuilt outside mmsparse.
"""
import copy
import hashlib
import os.path as osp
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor, nn

from ..core.finite import check_finite
from ..core.report import LayerStat, state_dict_report
from ..core.spec import CompressedLayer, FoldSpec
from ..utils import atomic_write
from ..version import __version__
from .plain_config import plain_config
from .verify import FOLD_META_KEY, verify_folded

FOLD_FORMAT = 1
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def compressed_layers(model: nn.Module) -> Dict[str, CompressedLayer]:
    """``{name: module}`` of every compressed layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, CompressedLayer)}


def _plain(obj: Any) -> bool:
    if isinstance(obj, _PLAIN_SCALARS):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, _PLAIN_SCALARS) and _plain(v) for k, v in obj.items())
    return False


def fold_specs(model: nn.Module) -> Dict[str, FoldSpec]:
    """``{layer: fold_spec()}`` of every compressed layer of ``model``."""
    return {name: module.fold_spec() for name, module in compressed_layers(model).items()}


@torch.no_grad()
def fold_state_dict(model: nn.Module) -> Tuple[Dict[str, Tensor], Dict[str, FoldSpec]]:
    """The plain state dict of ``model`` with every compressed layer folded.

    Returns:
        tuple: ``(state_dict, specs)``: the folded state dict (mmdet key names, contiguous CPU
        tensors) and ``{layer: FoldSpec}``.
    """
    layers = compressed_layers(model)
    specs = fold_specs(model)
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
    return folded, specs



@dataclass
class FoldResult:
    """What :func:`fold_checkpoint` wrote and found."""

    checkpoint: Optional[str]
    config: Optional[str]
    specs: Dict[str, FoldSpec]
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
               source_name: str = '') -> Tuple[dict, Dict[str, FoldSpec]]:
    """Fold ``model`` into a verified plain checkpoint dict (see module docstring).

    Raises:
        FloatingPointError: a parameter or buffer of ``model`` holds NaN/inf (named, with the count
            of bad values; e.g. a checkpoint of a diverged run).
        PatternViolationError: a folded layer breaks its declared pattern.
    """
    check_finite('fold', model, advice='refusing to fold a model with NaN/inf (a diverged run?): '
                 'fold a checkpoint from before the divergence')
    state, specs = fold_state_dict(model)
    verify_folded(state, specs)
    layers = {name: spec.to_meta() for name, spec in specs.items()}
    for name, entry in layers.items():
        if not _plain(entry):
            raise TypeError(f'{name}: fold_spec() must record plain Python values, got {entry}')
    meta: Dict[str, Any] = {}
    if source_meta:
        for key in ('dataset_meta', 'mmdet_version', 'mmengine_version', 'experiment_name'):
            if key in source_meta and _plain(source_meta[key]):
                meta[key] = copy.deepcopy(source_meta[key])
    meta[FOLD_META_KEY] = dict(format=FOLD_FORMAT, mmsparse_version=__version__,
                               source_checkpoint=source_name, source_sha256=source_sha256,
                               layers=layers)
    return dict(state_dict=state, meta=meta), specs


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
    folded, specs = fold_model(model, source.get('meta') if isinstance(source, dict) else None,
                               digest, osp.basename(checkpoint))
    plain = plain_config(cfg)  # fails before anything is written
    report = state_dict_report(folded['state_dict'], specs)
    result = FoldResult(None, None, specs, report, digest)
    if out_dir is not None:
        stem = out_name or osp.splitext(osp.basename(checkpoint))[0] + '_folded'
        ckpt_path = osp.join(out_dir, stem + '.pth')
        cfg_path = osp.join(out_dir, stem + '.py')
        atomic_write(ckpt_path, lambda tmp: torch.save(folded, tmp))
        atomic_write(cfg_path, lambda tmp: plain.dump(tmp))
        result.checkpoint, result.config = ckpt_path, cfg_path
    return result


__all__ = ['FOLD_FORMAT', 'FOLD_META_KEY', 'FoldResult', 'build_model', 'compressed_layers',
           'fold_checkpoint', 'fold_model', 'fold_specs', 'fold_state_dict',
           'load_source_checkpoint', 'sha256_file']
