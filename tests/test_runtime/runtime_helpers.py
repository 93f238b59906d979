"""Shared by the runtime tests: random weights with exact N:M zeros."""
import torch

from mmsparse.core.patterns import NMPattern, from_blocks, to_blocks


def nm_weight(shape, pattern: NMPattern, seed: int = 0) -> torch.Tensor:
    """A random weight of ``shape`` keeping the ``n`` largest of every block of ``m`` input channels."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    blocks = to_blocks(weight, pattern.m)
    keep = blocks.abs().topk(pattern.n, dim=1).indices
    blocks = blocks * torch.zeros_like(blocks).scatter_(1, keep, 1.0)
    weight = from_blocks(blocks, weight.shape).contiguous()
    assert not pattern.violations('w', weight)
    assert (weight != 0).sum() == weight.numel() * pattern.n // pattern.m
    return weight


def block_weight(shape, size: int, zero_share: float, seed: int = 0) -> torch.Tensor:
    """A random weight of ``shape`` whose ``size`` x ``size`` blocks of the 2-D view are zero with
    probability ``zero_share`` (at least one block kept, one zeroed)."""
    from mmsparse.core.blocks import block_grid, expand_block_mask
    gen = torch.Generator().manual_seed(seed)
    rows, cols = block_grid(shape, size)
    keep = (torch.rand(rows, cols, generator=gen) >= zero_share).float()
    keep.view(-1)[0], keep.view(-1)[-1] = 1.0, 0.0
    return torch.randn(shape, generator=gen) * expand_block_mask(keep, shape, size)
