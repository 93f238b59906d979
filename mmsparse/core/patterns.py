"""N:M patterns and the input-channel block layout shared by every method and by export.

A block is ``m`` consecutive input channels at a fixed (output channel, kernel row, kernel column):
``W.permute(0, 2, 3, 1).reshape(-1, m)`` for a conv weight ``(O, I, kh, kw)`` and ``W.reshape(-1, m)``
for a linear weight ``(O, I)``. This is the layout of NVIDIA ASP, TensorRT's sparse tactics and SR-STE.

Compressed N:M storage of a weight (:meth:`NMPattern.pack`): ``values`` ``(G, N)``, the kept values of
each block in increasing position order (a block with fewer than ``N`` non-zeros is padded with zeros
at unused positions), and ``indices``, the ``G·N`` in-block positions bit-packed with ``bits`` bits
each (the smallest of 1, 2, 4, 8 with ``2**bits >= M``), little-endian within a byte (first position
in the lowest bits): 2:4 uses 2 bits per kept value, 1:16 4 bits.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn


@dataclass
class Violation:
    """A block that breaks its declared N:M pattern."""

    layer: str
    block: tuple     # (out channel, kernel row, kernel col, first input channel) or (out, first in)
    nonzeros: int
    pattern: 'NMPattern'

    def __str__(self) -> str:
        return (f'{self.layer}: block {self.block} has {self.nonzeros} non-zeros, pattern '
                f'{self.pattern} allows {self.pattern.n}')


def index_bits(m: int) -> int:
    """Bits per stored in-block position for block length ``m``."""
    for bits in (1, 2, 4, 8):
        if (1 << bits) >= m:
            return bits
    raise ValueError(f'block length M={m} > 256 is not supported by the N:M storage')


def pack_indices(indices: Tensor, bits: int) -> Tensor:
    """Bit-pack non-negative integers below ``2**bits`` into uint8, little-endian within a byte."""
    flat = indices.flatten().to(torch.uint8)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_indices` for the first ``count`` values."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return values.flatten()[:count].to(torch.long)


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

    def meta(self) -> dict:
        """Nothing beside the ``'N:M'`` string is recorded in the fold meta."""
        return {}

    def density(self, weight: Tensor) -> float:
        """The share of the weight an N:M kernel computes: ``N / M``."""
        return self.n / self.m

    #: the weight has a compressed storage (:meth:`pack` / :meth:`unpack`)
    packable = True

    def violations(self, layer: str, weight: Tensor, limit: int = 10) -> List[Violation]:
        """Blocks of ``weight`` with more than ``n`` non-zeros (at most ``limit`` of them)."""
        nnz = (to_blocks(weight.detach(), self.m) != 0).sum(dim=1)
        bad = torch.nonzero(nnz > self.n).flatten()[:limit].tolist()
        if weight.dim() == 4:
            o, i, kh, kw = weight.shape
            per_pos = i // self.m
            coords = [(b // (kh * kw * per_pos), b // (kw * per_pos) % kh, b // per_pos % kw,
                       b % per_pos * self.m) for b in bad]
        else:
            per_row = weight.shape[1] // self.m
            coords = [(b // per_row, b % per_row * self.m) for b in bad]
        return [Violation(layer, c, int(nnz[b]), self) for c, b in zip(coords, bad)]

    def compress(self, weight: Tensor) -> Tuple[Tensor, Tensor]:
        """``(values (G, N), indices (G, N))`` of an N:M weight (layout in the module docstring).

        Raises:
            ValueError: a block has more than ``n`` non-zeros.
        """
        blocks = to_blocks(weight.detach(), self.m)
        nonzero = blocks != 0
        if int(nonzero.sum(dim=1).max()) > self.n:
            raise ValueError(f'weight breaks the {self} pattern; fold and verify it first')
        # non-zeros first (stable: by position), then zero positions as padding; keep N, by position
        order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :self.n]
        indices, _ = order.sort(dim=1)
        return blocks.gather(1, indices).contiguous(), indices

    def decompress(self, values: Tensor, indices: Tensor, shape: Sequence[int]) -> Tensor:
        """Dense weight of ``shape`` from :meth:`compress` output."""
        blocks = values.new_zeros(values.shape[0], self.m)
        blocks.scatter_(1, indices, values)
        return from_blocks(blocks, torch.Size(shape)).contiguous()

    def pack(self, weight: Tensor) -> Dict[str, Tensor]:
        """The stored form: ``values`` and bit-packed ``indices`` (see the module docstring)."""
        values, indices = self.compress(weight)
        return dict(values=values, indices=pack_indices(indices, index_bits(self.m)))

    def unpack(self, tensors: Dict[str, Tensor], shape: Sequence[int]) -> Tensor:
        """The dense weight of ``shape`` from :meth:`pack` output (bit-exact)."""
        values = tensors['values']
        indices = unpack_indices(tensors['indices'], index_bits(self.m), values.numel())
        return self.decompress(values, indices.view(values.shape), shape)

    def stored_nbytes(self, weight: Tensor, value_bytes: int) -> int:
        """Bytes of :meth:`pack` output for ``weight`` with values of ``value_bytes`` each."""
        kept = weight.numel() // self.m * self.n
        return kept * value_bytes + -(-kept * index_bits(self.m) // 8)


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

