"""Hard N:M masks and block selection with a defined tie rule.

Tie rule (all selections here): among equal magnitudes the element with the lower index in the block
(or the lower block index) wins. ``argmax`` (first maximum) and stable sorts implement it; it is what
makes masks reproducible.
"""
import torch
from torch import Tensor

from .patterns import from_blocks, to_blocks


def hard_nm_mask_blocks(abs_blocks: Tensor, n: int) -> Tensor:
    """Binary ``(G, M)`` mask keeping the ``n`` largest entries of each row of ``abs_blocks``.

    ``n`` passes of a row-wise ``argmax`` (selection, no sort): each pass takes the first maximum of
    what is left, so ties go to the lower channel index. ``abs_blocks`` must be non-negative.
    """
    mask = torch.zeros_like(abs_blocks)
    work = abs_blocks.clone() if n > 1 else abs_blocks
    for step in range(n):
        idx = work.argmax(dim=1, keepdim=True)
        mask.scatter_(1, idx, 1.0)
        if step + 1 < n:
            work.scatter_(1, idx, -1.0)
    return mask


def hard_nm_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Binary mask of ``weight``'s shape keeping the ``n`` largest |w| of every ``m``-block."""
    blocks = to_blocks(weight.detach().abs(), m)
    return from_blocks(hard_nm_mask_blocks(blocks, n), weight.shape).contiguous()


def smallest_indices(values: Tensor, k: int) -> Tensor:
    """Indices (ascending) of the ``k`` smallest entries of a 1-D tensor; lower index wins ties.

    Selection, not sorting: one ``kthvalue`` gives the k-th smallest value ``v``; every entry below
    ``v`` is taken, then the lowest-index entries equal to ``v`` fill up to ``k``.
    """
    if k <= 0:
        return values.new_empty(0, dtype=torch.long)
    if k >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    v_k = torch.kthvalue(values, k).values
    below = values < v_k
    tied = (values == v_k).nonzero().flatten()[:k - int(below.sum())]
    chosen = below.clone()
    chosen[tied] = True
    return chosen.nonzero().flatten()


def largest_indices(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of a 1-D tensor (lower index wins ties)."""
    if k <= 0:
        return values.new_empty(0, dtype=torch.long)
    return torch.sort(values, descending=True, stable=True).indices[:k]
