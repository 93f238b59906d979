"""Access to mmsparse's compiled CPU kernels (``mmsparse._ext``, built by ``pip install -e .``).

The kernels register as ``torch.ops.mmsparse.*``. Tensor-op implementations of the same definitions
stay in Python: they serve GPU tensors and are the reference the kernels are tested against.
"""
import importlib
from typing import Optional

import torch
from mmengine.logging import print_log
from torch import Tensor

_loaded: Optional[bool] = None


def kernels_available() -> bool:
    """Whether ``mmsparse._ext`` is built; warns once when it is not (CPU masks are then slower)."""
    global _loaded
    if _loaded is None:
        try:
            importlib.import_module('mmsparse._ext')
            _loaded = True
        except ImportError as err:
            _loaded = False
            print_log(f'mmsparse._ext is not built ({err}); CPU masks and quantizers fall back to '
                      'slower tensor ops. Rebuild with `bash tools/install.sh`.',
                      logger='current', level=30)
    return _loaded


def use_kernel(tensor: Tensor) -> bool:
    """Whether a compiled CPU kernel applies to ``tensor`` (float32 on the CPU, kernels built)."""
    return tensor.device.type == 'cpu' and tensor.dtype == torch.float32 and kernels_available()
