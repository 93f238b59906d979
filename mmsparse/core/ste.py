"""Straight-through masking shared by the sparse layers."""
import torch
from torch import Tensor


class _MaskSTE(torch.autograd.Function):
    """Forward ``weight * mask``; backward passes the incoming gradient to ``weight`` unchanged."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:  # noqa: D102
        return weight * mask

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # noqa: D102
        return grad_output, None


def mask_ste(weight: Tensor, mask: Tensor) -> Tensor:
    """``weight * mask`` with a straight-through gradient: pruned weights still get dense gradients."""
    return _MaskSTE.apply(weight, mask)
