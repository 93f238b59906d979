"""Small helpers shared by tools and modules."""
import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, List, Tuple

import torch
from mmengine.dist import all_reduce, get_world_size
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, data, indent: int = 2) -> None:
    """Write ``data`` as JSON atomically (:func:`atomic_write`); numpy/torch scalars as floats."""
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(data, f, indent=indent, default=float)
    atomic_write(path, write)


def check_config(cfg) -> None:
    """Pre-flight checks that name the culprit before the runner is built.

    * a ``conv_cfg`` whose layer type is not registered (mmcv's ``build_conv_layer`` reports it as
      "Cannot find None in registry");
    * a COCO-style training set without images or annotations (mmengine's dataset serialisation
      fails on it with "need at least one array to concatenate").
    """
    _check_train_annotations(cfg)
    _check_layer_types(cfg)


def _check_train_annotations(cfg) -> None:
    dataset = cfg.get('train_dataloader', {}).get('dataset', {})
    ann_file = dataset.get('ann_file')
    if not ann_file or not str(ann_file).endswith('.json'):
        return
    path = os.path.join(dataset.get('data_root') or '', ann_file)
    if not os.path.isfile(path) or os.path.getsize(path) > 1 << 20:
        return   # a missing file is reported by the dataset; an empty one is tiny (skip real COCO)
    with open(path) as f:
        coco = json.load(f)
    filter_empty = dataset.get('filter_cfg', {}).get('filter_empty_gt', False)
    if not coco.get('images') or (filter_empty and not coco.get('annotations')):
        raise ValueError(f'the training dataset is empty: {path} has {len(coco.get("images", []))} '
                         f'images and {len(coco.get("annotations", []))} annotations')


def _check_layer_types(cfg) -> None:
    from mmengine.registry import MODELS

    with MODELS.switch_scope_and_registry(cfg.get('default_scope', 'mmdet')) as registry:
        _walk_conv_cfgs(cfg.get('model', {}), 'model', registry)


def _walk_conv_cfgs(node, path: str, registry) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == 'conv_cfg' and isinstance(value, dict) and \
                    registry.get(value.get('type')) is None:
                raise KeyError(f'{path}.{key}: unknown layer type {value.get("type")!r} (is the '
                               "package that registers it in custom_imports?)")
            _walk_conv_cfgs(value, f'{path}.{key}', registry)
    elif isinstance(node, (list, tuple)):
        for idx, value in enumerate(node):
            _walk_conv_cfgs(value, f'{path}[{idx}]', registry)


def init_cpu_dist(launcher: str) -> None:
    """Start the gloo process group for ``--launcher pytorch`` on a machine without CUDA.

    mmengine 0.10.7's launcher calls ``torch.cuda.set_device`` unconditionally, which fails on
    CPU-only torch builds; the runner skips its own initialisation when a group already exists.
    """
    import torch.distributed as dist
    if launcher == 'pytorch' and not torch.cuda.is_available() and not dist.is_initialized():
        dist.init_process_group(backend='gloo')


def differing_across_ranks(named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the tensors whose bytes are not identical on every rank (``[]`` without DDP).

    Each rank hashes every tensor (dtype, shape and raw bytes) to a 64-bit digest and two
    all-reduces (min, max) of the digests compare them: exact, one collective pair per call, and
    the culprits are named. Every rank must pass the same names in the same order.
    """
    named = list(named_tensors)
    if get_world_size() == 1 or not named:
        return []
    digests = []
    for name, tensor in named:
        data = tensor.detach().cpu().contiguous().reshape(-1)
        h = hashlib.blake2b(f'{name}|{data.dtype}|{tuple(tensor.shape)}'.encode(), digest_size=8)
        h.update(data.view(torch.uint8).numpy().tobytes())
        digests.append(int.from_bytes(h.digest(), 'little', signed=True))
    low = torch.tensor(digests, dtype=torch.int64)
    high = low.clone()
    all_reduce(low, op='min')
    all_reduce(high, op='max')
    return [name for (name, _), lo, hi in zip(named, low.tolist(), high.tolist()) if lo != hi]
