"""Pre-flight checks of ``tools/train.py`` and ``tools/test.py``.

Inputs that would fail deep inside the runner, or worse train a silently wrong model, are refused
with one message that names the file, the layer or the setting, before the runner creates anything
on disk: missing or empty data, a ``--resume`` with nothing to resume, a checkpoint that cannot be
loaded or holds NaN/inf, a compression pattern that leaves most targeted layers dense. Facts that
change the run without being errors (frozen compressed layers, a fresh start under ``--resume``)
come back as notes for the runner's log.

Settings, in the config (all optional)::

    preflight = dict(max_dense_share=0.5)   # refuse when more targeted layers stay dense
"""
import json
import os
import os.path as osp
import re
import sys
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch
from mmengine.config import Config

from ..core.spec import CompressedLayer

#: annotation files up to this size are parsed (tiny and custom sets); COCO itself is only opened
_PARSE_LIMIT = 64 << 20
_DOWNLOAD_SCHEMES = ('torchvision://', 'open-mmlab://', 'openmmlab://', 'mmcls://', 'mmpretrain://',
                     'http://', 'https://')


class PreflightError(ValueError):
    """The configuration or its inputs cannot give a correct run; the message says why."""


@dataclass
class PreflightReport:
    """What the checks found that is worth a line in the log (nothing here is an error)."""

    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def log(self, logger) -> None:
        """Write the notes and warnings to ``logger`` (an :class:`~mmengine.logging.MMLogger`)."""
        for line in self.notes:
            logger.info(f'pre-flight: {line}')
        for line in self.warnings:
            logger.warning(f'pre-flight: {line}')


# -- resume -----------------------------------------------------------------------------------------
def resolve_resume(cfg: Config, resume: Optional[str], report: PreflightReport) -> None:
    """Apply ``--resume [PATH]`` to ``cfg`` without ever dropping ``load_from`` silently.

    ``--resume`` alone resumes from the work dir's latest checkpoint; when there is none yet (the
    first launch of a job that is always started with ``--resume``), the run starts fresh from the
    config's ``load_from``, and the report says so. ``--resume PATH`` must name an existing file.
    """
    if resume is None:
        return
    if resume != 'auto':
        if '://' not in resume and not osp.isfile(resume):
            raise PreflightError(f'--resume {resume}: the checkpoint does not exist')
        cfg.resume, cfg.load_from = True, resume
        return
    from mmengine.runner import find_latest_checkpoint
    latest = find_latest_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
    if latest is not None and not osp.isfile(latest):
        # a run killed while writing `last_checkpoint` leaves it empty (mmengine writes it in place,
        # after the checkpoint itself): take the newest checkpoint file instead
        stale, latest = latest, _newest_checkpoint(cfg.work_dir)
        report.notes.append(f'--resume: {osp.join(cfg.work_dir, "last_checkpoint")} names '
                            f'{stale!r}, which does not exist (a killed run?); using the newest '
                            f'checkpoint file, {latest}')
    if latest is not None:
        cfg.resume, cfg.load_from = True, latest
        report.notes.append(f'--resume: resuming from {latest}, the latest checkpoint in '
                            f'{cfg.work_dir}')
        return
    cfg.resume = False
    start = f'from load_from={cfg.load_from}' if cfg.get('load_from') else 'from the initial weights'
    report.notes.append(f'--resume: no checkpoint in {cfg.work_dir} yet; starting a new run {start}')


def _newest_checkpoint(work_dir: str) -> Optional[str]:
    """The ``iter_N.pth`` / ``epoch_N.pth`` of ``work_dir`` with the largest N, if any."""
    found = [(int(m.group(2)), m.group(1) == 'iter', name) for name in os.listdir(work_dir)
             if (m := re.fullmatch(r'(iter|epoch)_(\d+)\.pth', name))]
    return osp.join(work_dir, max(found)[2]) if found else None


# -- data -------------------------------------------------------------------------------------------
def _datasets(node, path: str) -> Iterator[Tuple[str, dict]]:
    """Every dataset config with an ``ann_file`` inside ``node`` (wrappers such as RepeatDataset)."""
    if isinstance(node, dict):
        if node.get('ann_file'):
            yield path, node
        for key in ('dataset', 'datasets'):
            if key in node:
                yield from _datasets(node[key], f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for idx, item in enumerate(node):
            yield from _datasets(item, f'{path}[{idx}]')


def _join(root: str, path: str) -> str:
    return path if not root or osp.isabs(path) or '://' in path else osp.join(root, path)


def check_data(cfg: Config, splits: List[str]) -> None:
    """The data root, image folder and annotation file of each split exist and hold samples."""
    from mmengine.registry import DATASETS
    with DATASETS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        for split in splits:
            _check_split(cfg, split, registry)


def _check_split(cfg: Config, split: str, registry) -> None:
    loader = cfg.get(split)
    if loader:
        for path, dataset in _datasets(loader.get('dataset', {}), f'{split}.dataset'):
            root = dataset.get('data_root') or ''
            if root and '://' not in root and not osp.isdir(root):
                raise PreflightError(
                    f'data root {root!r} ({path}.data_root) does not exist: put the dataset there '
                    f'(COCO layout: annotations/, train2017/, val2017/) or point the config at your '
                    f'copy, e.g. --cfg-options {path}.data_root=/path/to/coco/ (your own data: '
                    'docs/own_data.md)')
            img = (dataset.get('data_prefix') or {}).get('img')
            if img and not osp.isdir(_join(root, img)):
                raise PreflightError(f'image folder {_join(root, img)!r} ({path}.data_prefix.img) '
                                     'does not exist')
            classes = (dataset.get('metainfo') or {}).get('classes') or \
                _default_classes(dataset, registry)
            _check_annotations(_join(root, dataset['ann_file']), path, dataset, classes,
                               train=split == 'train_dataloader')
        evaluator = cfg.get(split.replace('_dataloader', '_evaluator'))
        for metric in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]:
            ann = metric.get('ann_file') if isinstance(metric, dict) else None
            if ann and '://' not in ann and not osp.isfile(ann):
                name = split.replace('_dataloader', '_evaluator')
                raise PreflightError(f'annotation file {ann!r} ({name}.ann_file) does not exist')


def _default_classes(dataset: dict, registry) -> Optional[tuple]:
    """The classes of the dataset type itself (``CocoDataset.METAINFO``) when the config sets none."""
    cls = registry.get(dataset.get('type')) if isinstance(dataset.get('type'), str) else None
    return (getattr(cls, 'METAINFO', None) or {}).get('classes')


def _check_annotations(ann: str, path: str, dataset: dict, classes: Optional[tuple],
                       train: bool) -> None:
    if '://' in ann:
        return
    if not osp.isfile(ann):
        raise PreflightError(f'annotation file {ann!r} ({path}.ann_file) does not exist')
    size = osp.getsize(ann)
    if size == 0:
        raise PreflightError(f'annotation file {ann!r} ({path}.ann_file) is empty (0 bytes)')
    if not ann.endswith('.json') or size > _PARSE_LIMIT:
        return
    try:
        with open(ann) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreflightError(f'annotation file {ann!r} ({path}.ann_file) is not valid JSON: '
                             f'{err}') from err
    if not isinstance(coco, dict) or not coco.get('images'):
        raise PreflightError(f'the dataset is empty: annotation file {ann!r} ({path}.ann_file) '
                             'lists no images')
    categories = {c.get('id'): c.get('name') for c in coco.get('categories', [])}
    if classes:
        kept = {cid for cid, name in categories.items() if name in set(classes)}
        if not kept:
            raise PreflightError(
                f'the dataset is empty after class filtering: none of the {len(classes)} classes '
                f'{path} expects (e.g. {list(classes)[:3]}; set {path}.metainfo.classes for your '
                f'own) is a category of {ann!r} (its categories: '
                f'{sorted(map(str, categories.values()))[:5]})')
    else:
        kept = set(categories)
    filter_empty = (dataset.get('filter_cfg') or {}).get('filter_empty_gt', False)
    if train and filter_empty and not any(a.get('category_id') in kept
                                          for a in coco.get('annotations', [])):
        raise PreflightError(
            f'the training dataset is empty: {ann!r} has {len(coco["images"])} images but no '
            'annotation of the configured classes, and filter_empty_gt=True drops every image')


# -- weights ----------------------------------------------------------------------------------------
def _init_checkpoints(node, path: str) -> Iterator[Tuple[str, str]]:
    if isinstance(node, dict):
        if node.get('type') == 'Pretrained' and isinstance(node.get('checkpoint'), str):
            yield f'{path}.checkpoint', node['checkpoint']
        for key, value in node.items():
            yield from _init_checkpoints(value, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for idx, item in enumerate(node):
            yield from _init_checkpoints(item, f'{path}[{idx}]')


_ALTERNATIVES = ('use a local checkpoint instead: --cfg-options {path}=/path/to/weights.pth (any mmdet/'
                 'torchvision ResNet state dict; MaxQ\'s sparse ImageNet checkpoints convert with '
                 'tools/convert_maxq_checkpoint.py)')
_SCHEME_HOSTS = {'open-mmlab://': 'download.openmmlab.com', 'openmmlab://': 'download.openmmlab.com',
                 'mmcls://': 'download.openmmlab.com', 'mmpretrain://': 'download.openmmlab.com'}


def _reachable(host: str, timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _download_host(ckpt: str) -> Optional[str]:
    """The host a remote ``init_cfg`` checkpoint is fetched from, ``None`` if it is cached."""
    from urllib.parse import urlparse

    import torch.hub
    if ckpt.startswith(('http://', 'https://')):
        cached = osp.join(torch.hub.get_dir(), 'checkpoints', osp.basename(urlparse(ckpt).path))
        return None if osp.isfile(cached) else urlparse(ckpt).hostname
    return next((host for scheme, host in _SCHEME_HOSTS.items() if ckpt.startswith(scheme)), None)


def check_init_weights(cfg: Config) -> None:
    """Pretrained weights of ``init_cfg`` can be loaded here: local files exist, ``torchvision://``
    has torchvision (mmengine resolves those names through it), and a download that is not cached
    can reach its host (3 s connection probe)."""
    for path, ckpt in _init_checkpoints(cfg.get('model', {}), 'model'):
        if ckpt.startswith('torchvision://'):
            try:
                import torchvision  # noqa: F401
            except ImportError:
                raise PreflightError(
                    f'{path}={ckpt!r} needs torchvision, which is not installed (the CPU install '
                    'leaves it out; a CUDA install with TORCH_INDEX_URL adds it, see README): '
                    + _ALTERNATIVES.format(path=path)) from None
        elif ckpt.startswith(_DOWNLOAD_SCHEMES):
            host = _download_host(ckpt)
            if host is not None and not _reachable(host):
                raise PreflightError(f'{path}={ckpt!r} needs a download from {host}, which cannot '
                                     'be reached from here: ' + _ALTERNATIVES.format(path=path))
        elif not osp.isfile(ckpt):
            raise PreflightError(f'{path}={ckpt!r}: the file does not exist')


def check_checkpoint(filename: str, what: str) -> Optional[dict]:
    """A local checkpoint loads (through mmsparse's safe loader) and every float tensor is finite.

    Returns:
        dict | None: its state dict (``None`` for a remote checkpoint, which is not fetched here).
    """
    if '://' in filename:
        return None
    from mmengine.runner.checkpoint import CheckpointLoader

    from ..compat import UnsafeCheckpointError
    from ..core import find_nonfinite
    if not osp.isfile(filename):
        raise PreflightError(f'{what}: checkpoint {filename!r} does not exist')
    try:
        ckpt = CheckpointLoader.load_checkpoint(filename, map_location='cpu')
    except (RuntimeError, UnsafeCheckpointError, OSError) as err:
        raise PreflightError(f'{what}: {err}') from err
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, dict) else {}
    bad = find_nonfinite(state)
    if bad:
        more = f'; and {len(bad) - 3} more tensors' if len(bad) > 3 else ''
        raise PreflightError(f'{what} {filename!r}: {"; ".join(map(str, bad[:3]))}{more}. '
                             'Refusing to start from non-finite weights (a diverged run?)')
    return state


# -- compression ------------------------------------------------------------------------------------
def check_compression(cfg: Config, report: PreflightReport, state: Optional[dict] = None) -> None:
    """Build the model once on CPU and inspect its compressed layers.

    Refuses a pattern that leaves more than ``preflight.max_dense_share`` of the targeted layers
    dense (e.g. 2:3 on channels that are multiples of 16), and a ``load_from``/resume checkpoint
    (its ``state``) trained with another method; reports compressed layers whose weights are frozen
    (``frozen_stages``): their pattern is applied once to the loaded weights and never trained.
    """
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    try:
        model = MODELS.build(cfg.model)
    except ValueError as err:   # config errors of the layers and the converter (invalid N:M, ...)
        raise PreflightError(f'model: {err}') from err
    if state is not None:
        from ..compat import CheckpointMismatchError, check_compression_matches
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        try:
            check_compression_matches(model, state, cfg.load_from, bool(cfg.get('resume')))
        except CheckpointMismatchError as err:
            raise PreflightError(str(err)) from err
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, CompressedLayer)]
    if not layers:
        return
    specs = {name: module.fold_spec() for name, module in layers}
    dense = [(name, spec.reason) for name, spec in specs.items() if spec.dense]
    limit = float((cfg.get('preflight') or {}).get('max_dense_share', 0.5))
    if len(dense) > limit * len(layers):
        examples = '; '.join(f'{name}: {reason}' for name, reason in dense[:3])
        raise PreflightError(
            f'the compression pattern leaves {len(dense)} of the {len(layers)} targeted layers '
            f'dense ({examples}): the model would train and deploy (nearly) uncompressed. Choose '
            'a pattern the layers can take (N:M with M dividing their input channels, e.g. 1:16 '
            'or 2:4; a block size dividing their dimensions), or accept it with '
            f'preflight=dict(max_dense_share={len(dense) / len(layers):.2f})')
    frozen = [name for name, module in layers if not specs[name].dense
              and isinstance(getattr(module, 'weight', None), torch.nn.Parameter)
              and not module.weight.requires_grad]
    if frozen:
        report.warnings.append(
            f'{len(frozen)} compressed layers are frozen (requires_grad=False, e.g. by the '
            f'backbone\'s frozen_stages): {", ".join(frozen[:4])}{", ..." if len(frozen) > 4 else ""}. '
            'Their pattern is applied to the loaded weights and they are never trained, so pruned '
            'weights cannot recover; set frozen_stages=0 to fine-tune them, or leave them out of '
            'the conversion to keep them dense')
    if dense:
        report.notes.append(f'{len(dense)} of {len(layers)} targeted layers stay dense: '
                            + '; '.join(f'{name}: {reason}' for name, reason in dense[:4])
                            + ('; ...' if len(dense) > 4 else ''))
    del model


def check_hooks(cfg: Config) -> None:
    """Build each custom hook once, so its argument checks (schedules, budgets, phases) fail here."""
    import copy

    from mmengine.registry import HOOKS
    for idx, hook in enumerate(cfg.get('custom_hooks') or []):
        try:
            HOOKS.build(copy.deepcopy(hook))
        except ValueError as err:
            raise PreflightError(f'custom_hooks[{idx}] ({hook.get("type")}): {err}') from err


def check_train(cfg: Config, resume: Optional[str]) -> PreflightReport:
    """Every pre-flight check of ``tools/train.py``; edits ``cfg`` for ``--resume`` (see
    :func:`resolve_resume`)."""
    report = PreflightReport()
    resolve_resume(cfg, resume, report)
    check_data(cfg, ['train_dataloader', 'val_dataloader'])
    check_layer_types(cfg)
    check_hooks(cfg)
    check_init_weights(cfg)
    state = None
    if cfg.get('load_from'):
        state = check_checkpoint(cfg.load_from, '--resume' if cfg.get('resume') else 'load_from')
    check_compression(cfg, report, state)
    return report


def check_test(cfg: Config) -> PreflightReport:
    """Every pre-flight check of ``tools/test.py`` (the checkpoint is ``cfg.load_from``)."""
    report = PreflightReport()
    check_data(cfg, ['test_dataloader'])
    check_layer_types(cfg)
    check_checkpoint(cfg.load_from, 'checkpoint')
    return report


def check_layer_types(cfg: Config) -> None:
    """Every ``conv_cfg`` layer type is registered (mmcv reports it as "Cannot find None")."""
    from mmengine.registry import MODELS
    with MODELS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        _walk_conv_cfgs(cfg.get('model', {}), 'model', registry)


def _walk_conv_cfgs(node, path: str, registry) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'conv_cfg' and isinstance(value, dict) and \
                    registry.get(value.get('type')) is None:
                raise PreflightError(f'{path}.{key}: unknown layer type {value.get("type")!r} (is '
                                     'the package that registers it in custom_imports?)')
            _walk_conv_cfgs(value, f'{path}.{key}', registry)
    elif isinstance(node, (list, tuple)):
        for idx, value in enumerate(node):
            _walk_conv_cfgs(value, f'{path}[{idx}]', registry)


def run_or_exit(check, *args) -> PreflightReport:
    """Run a check; on :class:`PreflightError` print ``error: <message>`` and exit with status 2."""
    try:
        return check(*args)
    except PreflightError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)


__all__ = ['PreflightError', 'PreflightReport', 'check_train', 'check_test', 'resolve_resume',
           'check_data', 'check_checkpoint', 'check_compression', 'check_init_weights',
           'check_layer_types', 'check_hooks', 'run_or_exit']
