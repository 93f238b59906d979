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
