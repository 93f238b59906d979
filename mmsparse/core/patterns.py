"""N:M patterns and the input-channel block layout shared by every method and by export.

A block is ``m`` consecutive input channels at a fixed (output channel, kernel row, kernel column):
``W.permute(0, 2, 3, 1).reshape(-1, m)`` for a conv weight ``(O, I, kh, kw)`` and ``W.reshape(-1, m)``
for a linear weight ``(O, I)``. This is the layout of NVIDIA ASP, TensorRT's sparse tactics and SR-STE.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zeros in every block of ``m`` consecutive input channels.

    Args:
        n (int): Non-zeros kept per block, ``1 <= n < m``.
        m (int): Block length.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise TypeError(f'N:M must be integers, got n={self.n!r}, m={self.m!r}')
        if not 1 <= self.n < self.m:
            raise ValueError(f'invalid N:M pattern {self.n}:{self.m}: it needs 1 <= N < M')

    @classmethod
    def parse(cls, text: str) -> 'NMPattern':
        """Parse ``'2:4'`` into ``NMPattern(2, 4)``."""
        try:
            n, m = (int(v) for v in text.split(':'))
        except ValueError as err:
            raise ValueError(f'N:M pattern must look like "2:4", got {text!r}') from err
        return cls(n, m)

    def __str__(self) -> str:
        return f'{self.n}:{self.m}'


def to_blocks(weight: Tensor, m: int) -> Tensor:
    """Return the ``(G, m)`` block view of a conv or linear weight (a copy for convs)."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(-1, m)
    if weight.dim() == 2:
        return weight.reshape(-1, m)
    raise ValueError(f'N:M blocks need a conv (4-D) or linear (2-D) weight, got shape {tuple(weight.shape)}')


def from_blocks(blocks: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_blocks` for a weight of ``shape``."""
    if len(shape) == 4:
        o, i, kh, kw = shape
        return blocks.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return blocks.reshape(shape)


def nm_incompatibility(module: nn.Module, m: int) -> Optional[str]:
    """Why ``module`` cannot take an N:M pattern with block ``m``, or ``None`` if it can."""
    weight = getattr(module, 'weight', None)
    if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
        return 'no conv or linear weight'
    if getattr(module, 'groups', 1) != 1:
        return f'groups={module.groups}'
    in_channels = weight.shape[1]
    if weight.dim() == 4 and in_channels == 3:
        return 'the 3-channel stem is dense by rule'
    if in_channels % m != 0:
        return f'{in_channels} input channels not divisible by M={m}'
    return None


def max_nonzeros_per_block(weight: Tensor, m: int) -> int:
    """Largest number of non-zeros found in any block of ``m`` input channels."""
    return int((to_blocks(weight.detach(), m) != 0).sum(dim=1).max().item())
