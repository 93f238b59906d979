"""The MaxQ multi-axis soft N:M mask (Xiang et al., CVPR 2024), SPEC §1 steps 1-4.

``S = H ⊙ (1 + q_filter + q_kernel)``: ``H`` is the hard N:M mask with the ``floor(p·G)`` blocks of
smallest L1 norm forced dense, and each ``q_a`` enhances the weights that stay among the top
``n_a − k_a`` magnitudes of their row along axis ``a``.

Tie rule of the soft scores: a weight is "among the top" when ``|w| >= v_{k+1}`` (the (k+1)-th smallest
magnitude of its row), so all weights tied at the boundary are enhanced; the hard mask keeps exactly N
per block with the lower channel index winning ties (:mod:`mmsparse.core.masks`).

On float32 CPU weights the compiled kernel ``torch.ops.mmsparse.nm_mask`` computes ``S`` in a few
sweeps (exact selection by bracketing, soft scores only where ``H = 1``); :func:`maxq_mask_torch` is
the same definition with tensor ops, for other devices and as the kernel's reference.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.masks import (dense_block_count, hard_nm_mask_torch, into, mask_kernel_applies,
                          nm_mask_kernel)


def order_stats(rows: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k-th and (k+1)-th smallest value of every row (1-based, ``1 <= k < row_len``).

    Selection, not sorting: an unsorted ``topk`` of the ``row_len − k + 1`` largest values and the
    two smallest of those when that is the smaller side (e.g. 1:16), else one ``kthvalue`` plus the
    smallest value above it (e.g. 2:4).
    """
    keep = rows.shape[1] - k
    if keep + 1 <= k:
        top = torch.topk(rows, keep + 1, dim=1, largest=True, sorted=False).values
        two = torch.topk(top, 2, dim=1, largest=False, sorted=True).values
        return two[:, :1], two[:, 1:]
    v_k = torch.kthvalue(rows, k, dim=1, keepdim=True).values
    at_most = rows <= v_k
    above = rows.masked_fill(at_most, float('inf')).amin(dim=1, keepdim=True)
    tied = at_most.sum(dim=1, keepdim=True) > k   # the (k+1)-th smallest equals the k-th
    return v_k, torch.where(tied, v_k, above)


def axis_scores(rows: Tensor, n: int, m: int, tau: float) -> Tensor:
    """Soft scores ``q_a`` of non-negative ``rows`` (one query row per line).

    ``k = floor((m - n) / m · row_len)``; the threshold is the mean of the k-th and (k+1)-th smallest
    values (:func:`order_stats`).
    """
    v_k, v_k1 = order_stats(rows, (m - n) * rows.shape[1] // m)
    threshold = 0.5 * (v_k + v_k1)
    return (rows >= v_k1) * torch.sigmoid((rows - threshold) / tau)


@torch.no_grad()
def maxq_mask_torch(weight: Tensor, n: int, m: int, preserve: float, tau: float = 0.01,
                    checked: bool = False) -> Tensor:
    """:func:`maxq_mask` with tensor ops (any device); the hard mask refuses NaN/inf weights unless
    the caller has ``checked`` them (then nothing is read back from the device)."""
    abs_w = weight.detach().abs().float()
    hard = hard_nm_mask_torch(abs_w, n, m, preserve, checked)
    soft = 1.0 + axis_scores(abs_w.reshape(abs_w.shape[0], -1), n, m, tau).reshape(abs_w.shape)
    if abs_w.dim() == 4 and abs_w.shape[2] * abs_w.shape[3] > 1:
        kh, kw = abs_w.shape[2:]
        per_position = abs_w.permute(2, 3, 0, 1).reshape(kh * kw, -1)
        q_kernel = axis_scores(per_position, n, m, tau)
        soft += q_kernel.reshape(kh, kw, *abs_w.shape[:2]).permute(2, 3, 0, 1)
    return (hard * soft).to(weight.dtype)


@torch.no_grad()
def maxq_mask(weight: Tensor, n: int, m: int, preserve: float, tau: float = 0.01,
              out: Optional[Tensor] = None, checked: bool = False) -> Tensor:
    """The MaxQ soft mask ``S`` for a conv ``(O, I, kh, kw)`` or linear ``(O, I)`` weight.

    Args:
        weight (Tensor): The layer weight.
        n (int): Non-zeros per block.
        m (int): Block length (input channels).
        preserve (float): Share of blocks kept fully dense, in ``[0, 1]``.
        tau (float): Sigmoid temperature of the soft scores. Defaults to 0.01.
        out (Tensor, optional): Where to write ``S`` (the layer's mask buffer: the kernel then
            writes it in place, without a temporary). Defaults to None.
        checked (bool): The caller has verified that the weight is finite (tensor-op path only:
            the kernel checks as it goes). Defaults to False.

    Returns:
        Tensor: ``S`` of ``weight``'s shape with values in ``{0} ∪ [1, 3)`` (``out`` when given).

    Raises:
        ValueError: If the weight holds NaN or inf (``out`` is then left as it was).
    """
    weight = weight.detach()
    if mask_kernel_applies(weight, m):
        return nm_mask_kernel(weight, n, m, dense_block_count(weight, m, preserve), tau, True, out)
    return into(maxq_mask_torch(weight, n, m, preserve, tau, checked), out)
