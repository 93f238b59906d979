"""B×B block layout of conv and linear weights, block norms, block masks and the block verifier.

The 2-D view of a conv weight ``(O, I, kh, kw)`` is its implicit-GEMM matrix
``W.permute(0, 2, 3, 1).reshape(O, kh·kw·I)`` (columns ordered kernel row, kernel column, input
channel, input channel fastest: the same order as the N:M layout of :mod:`.patterns`); a linear
weight ``(O, I)`` is its own view. The view is tiled into B×B blocks on a ``(O/B, K/B)`` grid, blocks
numbered row-major. A block pattern ``'block16'`` says nothing more than "16×16 tiles, each either all
zero or not"; ``'block16@0.7'`` additionally requires at least 70% of the tiles to be exactly zero.
"""
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

_PATTERN = re.compile(r'block(\d+)(?:@([0-9]*\.?[0-9]+))?')


@dataclass(frozen=True)
class BlockPattern:
    """B×B tiles of the 2-D weight view, optionally with a minimum share of all-zero tiles.

    Args:
        size (int): Block side ``B`` (>= 1).
        min_sparsity (float, optional): Required share of all-zero blocks in ``[0, 1]``.
            Defaults to None (no requirement).
    """

    size: int
    min_sparsity: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f'block size must be a positive integer, got {self.size!r}')
        if self.min_sparsity is not None and not 0.0 <= self.min_sparsity <= 1.0:
            raise ValueError(f'block sparsity must be in [0, 1], got {self.min_sparsity}')

    @classmethod
    def parse(cls, text: str) -> 'BlockPattern':
        """Parse ``'block16'`` or ``'block16@0.7'``."""
        found = _PATTERN.fullmatch(text)
        if found is None:
            raise ValueError(f'block pattern must look like "block16" or "block16@0.7", got {text!r}')
        return cls(int(found.group(1)), None if found.group(2) is None else float(found.group(2)))

    def __str__(self) -> str:
        if self.min_sparsity is None:
            return f'block{self.size}'
        return f'block{self.size}@{np.format_float_positional(self.min_sparsity, trim="-")}'

    def meta(self) -> dict:
        """The plain values recorded beside the pattern string in the fold meta."""
        return dict(block_size=self.size, sparsity=self.min_sparsity)

    def density(self, weight: Tensor) -> float:
        """The share of non-zero blocks: what a block-sparse kernel computes."""
        return 1.0 - block_sparsity(weight, self.size)

    #: the weight has a compressed storage (:meth:`pack` / :meth:`unpack`)
    packable = True

    def violations(self, layer: str, weight: Tensor) -> List['BlockViolation']:
        """See :func:`block_violations`."""
        return block_violations(layer, weight, self)

    def pack(self, weight: Tensor) -> Dict[str, Tensor]:
        """BSR arrays of the weight's 2-D view (:func:`blocks_to_bsr`): zero blocks not stored."""
        return blocks_to_bsr(weight, self.size)

    def unpack(self, tensors: Mapping[str, Tensor], shape) -> Tensor:
        """The dense weight of ``shape`` from :meth:`pack` output (bit-exact)."""
        return bsr_to_weight(tensors, shape, self.size)

    def stored_nbytes(self, weight: Tensor, value_bytes: int) -> int:
        """Bytes of :meth:`pack` output with values of ``value_bytes`` each (int64 indices)."""
        rows, _ = block_grid(weight.shape, self.size)
        kept = int(nonzero_blocks(weight, self.size).sum())
        return kept * self.size ** 2 * value_bytes + (kept + rows + 1) * 8


def is_block(pattern: str) -> bool:
    """Whether a pattern string is a block pattern like ``'block16'``."""
    return _PATTERN.fullmatch(pattern) is not None


def view_2d(weight: Tensor) -> Tensor:
    """The ``(O, kh·kw·I)`` implicit-GEMM view of a conv weight (a copy), or a linear weight itself."""
    if weight.dim() == 4:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
    if weight.dim() == 2:
        return weight
    raise ValueError(f'block layout needs a conv (4-D) or linear (2-D) weight, got shape '
                     f'{tuple(weight.shape)}')


def from_view_2d(matrix: Tensor, shape) -> Tensor:
    """Inverse of :func:`view_2d` for a weight of ``shape``."""
    if len(shape) == 4:
        o, i, kh, kw = shape
        return matrix.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return matrix.reshape(shape)


def view_shape(shape) -> Tuple[int, int]:
    """Shape of the 2-D view of a weight of ``shape``."""
    if len(shape) == 4:
        return shape[0], shape[1] * shape[2] * shape[3]
    if len(shape) == 2:
        return tuple(shape)
    raise ValueError(f'block layout needs a conv (4-D) or linear (2-D) weight, got shape {tuple(shape)}')


def block_grid(shape, size: int) -> Tuple[int, int]:
    """``(rows, cols)`` of the block grid; raises ``ValueError`` when ``size`` does not tile the view."""
    rows, cols = view_shape(shape)
    if rows % size or cols % size:
        raise ValueError(f'{size}x{size} blocks do not tile the {rows}x{cols} weight view of shape '
                         f'{tuple(shape)}')
    return rows // size, cols // size


def block_incompatibility(module: nn.Module, size: int, min_blocks: int = 1) -> Optional[str]:
    """Why ``module`` cannot be block-sparsified with ``size``×``size`` blocks, or ``None``."""
    weight = getattr(module, 'weight', None)
    if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
        return 'no conv or linear weight'
    if getattr(module, 'groups', 1) != 1:
        return f'groups={module.groups}'
    rows, cols = view_shape(weight.shape)
    if rows % size or cols % size:
        return f'{rows}x{cols} view not divisible by B={size}'
    n_blocks = (rows // size) * (cols // size)
    if n_blocks < min_blocks:
        return f'{n_blocks} blocks < min_blocks={min_blocks}'
    return None


def to_tiles(matrix: Tensor, size: int) -> Tensor:
    """``(R, C, B, B)`` tiles of a 2-D matrix whose sides are multiples of ``size``."""
    rows, cols = matrix.shape
    return matrix.reshape(rows // size, size, cols // size, size).transpose(1, 2)


def block_norms(weight: Tensor, size: int, p: float = 2.0) -> Tensor:
    """``(R, C)`` p-norms of the blocks of ``weight`` (Frobenius norm for ``p=2``)."""
    block_grid(weight.shape, size)
    tiles = to_tiles(view_2d(weight.detach()), size)
    return tiles.flatten(2).norm(p=p, dim=2)


def expand_block_mask(block_mask: Tensor, shape, size: int) -> Tensor:
    """Weight-shaped tensor repeating each entry of an ``(R, C)`` block tensor over its block."""
    rows, cols = block_grid(shape, size)
    if tuple(block_mask.shape) != (rows, cols):
        raise ValueError(f'block tensor {tuple(block_mask.shape)} does not match the {rows}x{cols} '
                         f'grid of shape {tuple(shape)}')
    matrix = block_mask.repeat_interleave(size, 0).repeat_interleave(size, 1)
    return from_view_2d(matrix, shape).contiguous()


def _block_views(weight: Tensor, block_values: Tensor, size: int):
    """``(weight view, block view)`` that broadcast to ``weight ⊙ expand(block_values)``, or None when
    a block spans several kernel positions (``size`` not dividing a conv's input channels)."""
    rows, cols = block_grid(weight.shape, size)
    if tuple(block_values.shape) != (rows, cols):
        raise ValueError(f'block tensor {tuple(block_values.shape)} does not match the {rows}x{cols} '
                         f'grid of shape {tuple(weight.shape)}')
    if weight.dim() == 2:
        return (weight.view(rows, size, cols, size) if weight.is_contiguous()
                else weight.reshape(rows, size, cols, size)), block_values.reshape(rows, 1, cols, 1)
    o, i, kh, kw = weight.shape
    if i % size:
        return None
    # grid column c = (ky·kw + kx)·(I/B) + i//B  ->  (R, kh, kw, I/B)
    values = block_values.reshape(rows, kh, kw, i // size).permute(0, 3, 1, 2)
    shape = (rows, size, i // size, size, kh, kw)
    return (weight.view(shape) if weight.is_contiguous() else weight.reshape(shape),
            values.reshape(rows, 1, i // size, 1, kh, kw))


def block_multiply(weight: Tensor, block_values: Tensor, size: int) -> Tensor:
    """``weight ⊙ expand_block_mask(block_values)`` without materialising the expanded mask.

    When ``size`` divides the input channels of a conv (or for a linear layer), every block lies at
    one kernel position, so the ``(R, C)`` block tensor broadcasts over a reshaped weight; this is
    cheaper in forward and backward than :func:`expand_block_mask`. Otherwise it falls back to it.
    """
    views = _block_views(weight, block_values, size)
    if views is None:
        return weight * expand_block_mask(block_values, weight.shape, size)
    return (views[0] * views[1]).reshape(weight.shape)


@torch.no_grad()
def block_multiply_(weight: Tensor, block_values: Tensor, size: int) -> Tensor:
    """In-place :func:`block_multiply` (the same products, one pass, no temporary when ``weight``
    is contiguous); returns ``weight``."""
    views = _block_views(weight, block_values, size)
    if views is None:
        return weight.mul_(expand_block_mask(block_values, weight.shape, size))
    if weight.is_contiguous():
        views[0].mul_(views[1])
    else:
        weight.copy_((views[0] * views[1]).reshape(weight.shape))
    return weight


def nonzero_blocks(weight: Tensor, size: int) -> Tensor:
    """``(R, C)`` bool: which blocks hold at least one non-zero."""
    block_grid(weight.shape, size)
    return (to_tiles(view_2d(weight.detach()), size) != 0).flatten(2).any(dim=2)


def block_sparsity(weight: Tensor, size: int) -> float:
    """Share of all-zero ``size``×``size`` blocks of ``weight``."""
    nonzero = nonzero_blocks(weight, size)
    return 1.0 - nonzero.sum().item() / nonzero.numel()


@dataclass
class BlockViolation:
    """A layer that breaks its declared block pattern."""

    layer: str
    pattern: str
    message: str

    def __str__(self) -> str:
        return f'{self.layer}: {self.message} (pattern {self.pattern})'


def block_violations(name: str, weight: Tensor, pattern: BlockPattern) -> List[BlockViolation]:
    """Whether ``weight`` is tiled by the pattern's blocks and has enough all-zero blocks.

    The required count of zero blocks is ``ceil(min_sparsity · n_blocks − 1e-6)`` ("at least that
    share"; the 1e-6 absorbs the float error of a decimal share such as 0.7).
    """
    try:
        rows, cols = block_grid(weight.shape, pattern.size)
    except ValueError as err:
        return [BlockViolation(name, str(pattern), str(err))]
    if pattern.min_sparsity is None:
        return []
    n_blocks = rows * cols
    zeros = n_blocks - int(nonzero_blocks(weight, pattern.size).sum().item())
    needed = math.ceil(pattern.min_sparsity * n_blocks - 1e-6)
    if zeros < needed:
        return [BlockViolation(name, str(pattern),
                               f'{zeros}/{n_blocks} blocks are exactly zero, {needed} required')]
    return []


def blocks_to_bsr(weight: Tensor, size: int) -> Dict[str, Tensor]:
    """BSR arrays of the 2-D view of ``weight``: only blocks with a non-zero are stored.

    Returns:
        dict: ``crow_indices`` (R + 1,), ``col_indices`` (nnz blocks,), ``values`` (nnz, B, B), the
        layout of ``torch.sparse_bsr_tensor``.
    """
    matrix = view_2d(weight.detach())
    keep = nonzero_blocks(weight, size)
    tiles = to_tiles(matrix, size)
    crow = torch.zeros(keep.shape[0] + 1, dtype=torch.int64)
    crow[1:] = keep.sum(dim=1).cumsum(0)
    rows, cols = torch.nonzero(keep, as_tuple=True)
    return dict(crow_indices=crow, col_indices=cols.to(torch.int64),
                values=tiles[rows, cols].contiguous())


def bsr_to_weight(bsr: Mapping[str, Tensor], shape, size: int) -> Tensor:
    """Dense weight of ``shape`` rebuilt from :func:`blocks_to_bsr` arrays."""
    rows, cols = block_grid(shape, size)
    crow = bsr['crow_indices']
    row_idx = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    tiles = bsr['values'].new_zeros(rows, cols, size, size)
    tiles[row_idx, bsr['col_indices']] = bsr['values']
    matrix = tiles.transpose(1, 2).reshape(rows * size, cols * size)
    return from_view_2d(matrix, shape).contiguous()
