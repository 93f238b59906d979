"""Hard N:M masks and block selection with a defined tie rule.

Tie rule (all selections here): among equal magnitudes the element with the lower index in the block
(or the lower block index) wins. ``argmax`` (first maximum) and stable sorts implement it; it is what
makes masks reproducible.

On float32 CPU tensors the masks come from the compiled kernel ``torch.ops.mmsparse.nm_mask``
(:mod:`mmsparse.core.ext`); the ``*_torch`` functions implement the same definition with tensor ops
for other devices and as the reference the kernel is tested against.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from .ext import use_kernel
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


def dense_block_count(weight: Tensor, m: int, preserve: float) -> int:
    """``floor(preserve·G)``: how many of the ``G`` blocks stay fully dense at preserve rate ``preserve``."""
    return math.floor(preserve * (weight.numel() // m))


def check_finite(weight: Tensor) -> None:
    """Raise ``ValueError`` if ``weight`` holds NaN or inf (no mask can be computed from it)."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError('weight holds NaN or inf')


def hard_nm_mask_torch(abs_weight: Tensor, n: int, m: int, preserve: float = 0.0,
                       checked: bool = False) -> Tensor:
    """:func:`hard_nm_mask` with tensor ops, from the magnitudes ``abs_weight``.

    ``checked=True``: the caller has verified that the weight is finite (MaxQHook does it for all
    layers with one host synchronisation), so this call reads nothing back from the device.
    """
    if not checked:
        check_finite(abs_weight)
    blocks = to_blocks(abs_weight, m)
    hard = hard_nm_mask_blocks(blocks, n)
    n_dense = dense_block_count(abs_weight, m, preserve)
    if n_dense > 0:
        hard[smallest_indices(blocks.sum(dim=1, dtype=torch.float64), n_dense)] = 1.0
    return from_blocks(hard, abs_weight.shape).contiguous()


#: the largest block length the compiled mask kernel takes (longer blocks run the tensor ops)
KERNEL_MAX_M = 32


def mask_kernel_applies(weight: Tensor, m: int) -> bool:
    """Whether ``torch.ops.mmsparse.nm_mask`` serves ``weight`` with blocks of ``m``."""
    return use_kernel(weight) and m <= KERNEL_MAX_M


def into(value: Tensor, out: Optional[Tensor]) -> Tensor:
    """``value``, copied into ``out`` when one is given."""
    if out is None:
        return value
    return out.copy_(value)


def nm_mask_kernel(weight: Tensor, n: int, m: int, n_dense: int, tau: float, soft: bool,
                   out: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.mmsparse.nm_mask`` (float32 CPU ``weight``), written straight into ``out`` when
    it is a contiguous float32 CPU tensor of the weight's shape (no temporary, no copy).

    A non-finite weight raises ``ValueError`` before ``out`` is written.
    """
    if (out is not None and out.device.type == 'cpu' and out.dtype == torch.float32
            and out.is_contiguous() and out.shape == weight.shape):
        torch.ops.mmsparse.nm_mask_into(weight, n, m, n_dense, tau, soft, out)
        return out
    return into(torch.ops.mmsparse.nm_mask(weight, n, m, n_dense, tau, soft), out)


def hard_nm_mask(weight: Tensor, n: int, m: int, preserve: float = 0.0,
                 out: Optional[Tensor] = None, checked: bool = False) -> Tensor:
    """Binary mask of ``weight``'s shape keeping the ``n`` largest |w| of every ``m``-block.

    The ``floor(preserve·G)`` blocks of smallest L1 norm (summed in float64, so the choice does not
    depend on summation order) stay fully dense: MaxQ's gradual schedule (SPEC §1.2). Raises
    ``ValueError`` if the weight holds NaN or inf (``out`` is then left as it was; ``checked``: the
    caller has checked, see :func:`hard_nm_mask_torch`). With ``out`` the mask is written into it
    and ``out`` returned.
    """
    weight = weight.detach()
    if mask_kernel_applies(weight, m):
        return nm_mask_kernel(weight, n, m, dense_block_count(weight, m, preserve), 1.0, False, out)
    return into(hard_nm_mask_torch(weight.abs(), n, m, preserve, checked).to(weight.dtype), out)


@torch.no_grad()
def decay_pruned_(grad: Tensor, weight: Tensor, mask: Tensor, decay: float) -> None:
    """The SR-STE decay in place: ``grad += decay·(1 − clamp(mask, 0, 1))·weight``.

    Contiguous float32 CPU tensors take one compiled pass (``torch.ops.mmsparse.nm_decay_``, the
    same arithmetic as the tensor ops, bit-identical for masks in ``{0} ∪ [1, ∞)``); anything else
    runs ``addcmul_``.
    """
    if all(use_kernel(t) and t.is_contiguous() for t in (grad, weight, mask)):
        torch.ops.mmsparse.nm_decay_(grad, weight, mask, decay)
    else:
        grad.addcmul_(weight, mask.clamp(0.0, 1.0).neg_().add_(1.0), value=decay)


def smallest_indices(values: Tensor, k: int) -> Tensor:
    """Indices (ascending) of the ``k`` smallest entries of a 1-D tensor; lower index wins ties.

    A stable sort: no value is read back to the host, so on a GPU it runs without synchronising.
    """
    if k <= 0:
        return values.new_empty(0, dtype=torch.long)
    if k >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    return torch.argsort(values, stable=True)[:k].sort().values
