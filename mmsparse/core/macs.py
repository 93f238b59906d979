"""Multiply-accumulates of conv, deconv and linear calls, counted by forward hooks.

One counter serves CGMQ's bit-operations cost (MACs at the configured input shape) and the
inference benchmark (dense MACs, and the share a sparse kernel computes).
"""
import math
from typing import Callable, Dict, Iterable, Optional

from torch import Tensor, nn

COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def layer_macs(module: nn.Module, inputs: tuple, output: Tensor) -> int:
    """MACs of one call of a conv, transposed conv or linear layer."""
    if isinstance(module, nn.ConvTranspose2d):
        return inputs[0].numel() * module.out_channels // module.groups * \
            math.prod(module.kernel_size)
    if isinstance(module, nn.Conv2d):
        return output.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
    return output.numel() * module.in_features


class MacCounter:
    """``counts[name]``: the MACs of every counted layer's calls while the context is active.

    Args:
        model (nn.Module): The model to watch.
        layers (Iterable[str], optional): Names of the layers to count. Defaults to every conv,
            transposed conv and linear layer.
    """

    def __init__(self, model: nn.Module, layers: Optional[Iterable[str]] = None) -> None:
        modules = dict(model.named_modules())
        names = [n for n, m in modules.items() if isinstance(m, COUNTED)] if layers is None \
            else list(layers)
        self._modules = {name: modules[name] for name in names}
        self.counts: Dict[str, int] = dict.fromkeys(names, 0)
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.counts[name] += layer_macs(module, inputs, output)
        return hook

    def __enter__(self) -> 'MacCounter':
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def total(self) -> int:
        """All counted MACs."""
        return sum(self.counts.values())

    def weighted(self, density: Dict[str, float]) -> float:
        """MACs with each layer counted at its ``density`` (1 for layers not listed)."""
        return sum(c * density.get(name, 1.0) for name, c in self.counts.items())
