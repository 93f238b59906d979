"""One conv and one linear scaffold for every compressed layer family.

A family (N:M, blocks, CGMQ) is a :class:`~mmsparse.core.spec.CompressedLayer` mixin that declares
its options in ``init_compression`` and computes ``layer_weight()`` (and, to quantize inputs,
``layer_input``); a method is that mixin with its behaviour overridden, placed before
:class:`CompressedConv2d` or :class:`CompressedLinear`::

    class MaxQConv2d(MaxQMixin, CompressedConv2d): ...

The scaffold subclasses the plain torch layer, so ``weight`` / ``bias`` keep their names and dense
checkpoints stay interchangeable with stock mmdet; it splits the keyword arguments between the torch
layer and ``init_compression`` and runs ``forward`` as the torch layer does on the compressed weight.
"""
import inspect
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .spec import CompressedLayer

INCOMPATIBLE_CHOICES = ('dense', 'error')


class PatternLayer(CompressedLayer):
    """A layer that takes a structural pattern (N:M, blocks) unless a rule keeps it dense."""

    dense_reason: Optional[str] = None

    def set_dense_reason(self, reason: Optional[str], incompatible: str, pattern: str) -> None:
        """Record why the layer stays dense (``None``: it takes ``pattern``).

        ``incompatible='error'`` turns a reason into a ``ValueError`` at build time.
        """
        if incompatible not in INCOMPATIBLE_CHOICES:
            raise ValueError(f'incompatible must be one of {INCOMPATIBLE_CHOICES}, got {incompatible!r}')
        self.dense_reason = reason
        if reason is not None and incompatible == 'error':
            raise ValueError(f'{type(self).__name__} {tuple(self.weight.shape)} cannot take '
                             f'{pattern}: {reason}')

    @property
    def is_sparse(self) -> bool:
        """Whether the layer carries its pattern (``False`` for dense-by-rule layers)."""
        return self.dense_reason is None


def _split_options(layer: nn.Module, kwargs: dict) -> dict:
    """Pop the keyword arguments that ``layer.init_compression`` declares out of ``kwargs``."""
    names = inspect.signature(layer.init_compression).parameters
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


class CompressedConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing ``conv(layer_input(x), layer_weight())`` (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        options = _split_options(self, kwargs)
        super().__init__(*args, **kwargs)
        self.init_compression(**options)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(self.layer_input(x), self.layer_weight(), self.bias)


class CompressedLinear(nn.Linear):
    """``nn.Linear`` computing ``linear(layer_input(x), layer_weight())``."""

    def __init__(self, *args, **kwargs) -> None:
        options = _split_options(self, kwargs)
        super().__init__(*args, **kwargs)
        self.init_compression(**options)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(self.layer_input(x), self.layer_weight(), self.bias)
