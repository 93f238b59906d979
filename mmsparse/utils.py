"""Small helpers shared by tools and modules."""
import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, List, Tuple

import torch
from mmengine.dist import all_reduce, get_world_size
from mmengine.model import is_model_wrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / MMEngine wrapper."""
    return model.module if is_model_wrapper(model) else model


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
