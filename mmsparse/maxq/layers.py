"""N:M sparse conv and linear layers: MaxQ and its two baselines (SR-STE, one-shot magnitude).

Each layer subclasses the plain torch layer, so parameter names (``weight``, ``bias``) and dense
checkpoints stay interchangeable with stock mmdet; the only extra state is the persistent ``mask``
buffer. Masks are set by :class:`~mmsparse.maxq.MaxQHook` from the runner's progress (never from a
counter inside the layer); the layer only applies them.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.masks import hard_nm_mask
from ..core.patterns import NMPattern, nm_incompatibility
from ..core.spec import CompressedLayer, Dense, FoldSpec
from ..core.ste import mask_ste
from .mask import maxq_mask

INCOMPATIBLE_CHOICES = ('dense', 'error')


class NMSparseMixin(CompressedLayer):
    """Shared N:M machinery: pattern, dense-by-rule check, mask buffer, gradient edits, folding.

    Subclasses set ``method`` to ``'maxq'``, ``'srste'`` or ``'oneshot'``.
    """

    method: str = ''
    #: state added to the plain torch layer (shared code compares checkpoints by these names)
    compression_state = ('mask',)
    weight: nn.Parameter
    mask: Tensor

    def _init_nm(self, n: int, m: int, tau: float, incompatible: str) -> None:
        if incompatible not in INCOMPATIBLE_CHOICES:
            raise ValueError(f'incompatible must be one of {INCOMPATIBLE_CHOICES}, got {incompatible!r}')
        if tau <= 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        self.pattern = NMPattern(n, m)
        self.tau = tau
        self.dense_reason: Optional[str] = nm_incompatibility(self, m)
        if self.dense_reason is not None and incompatible == 'error':
            raise ValueError(f'{type(self).__name__} {tuple(self.weight.shape)} cannot take the '
                             f'{self.pattern} pattern: {self.dense_reason}')
        self.register_buffer('mask', torch.ones_like(self.weight, requires_grad=False))
        self._mask_key: Optional[tuple] = None

    @property
    def is_sparse(self) -> bool:
        """Whether the layer carries the N:M pattern (``False`` for dense-by-rule layers)."""
        return self.dense_reason is None

    @property
    def recompute_each_step(self) -> bool:
        """MaxQ and SR-STE follow the weights every step; one-shot keeps its first mask."""
        return self.method != 'oneshot'

    @torch.no_grad()
    def compute_mask(self, preserve: float) -> Tensor:
        """The mask for the current weights at preserve rate ``preserve`` (pure function).

        Raises ``ValueError`` if the weight holds NaN or inf.
        """
        if self.method == 'maxq':
            return maxq_mask(self.weight, self.pattern.n, self.pattern.m, preserve, self.tau)
        if self.method == 'srste':
            return hard_nm_mask(self.weight, self.pattern.n, self.pattern.m, preserve)
        return hard_nm_mask(self.weight, self.pattern.n, self.pattern.m)

    @torch.no_grad()
    def refresh_mask(self, preserve: float) -> None:
        """Recompute the stored mask from the current weights.

        Skipped when neither the weights (their in-place version counter) nor ``preserve`` changed
        since the last computation, e.g. for frozen stages once the schedule has ended.
        """
        key = (preserve, self.weight._version, self.weight.data_ptr())
        if self.is_sparse and key != self._mask_key:
            self.mask.copy_(self.compute_mask(preserve))
            self._mask_key = key

    def sparse_weight(self) -> Tensor:
        """``W ⊙ S`` with a straight-through gradient to ``W``."""
        if not self.is_sparse:
            return self.weight
        return mask_ste(self.weight, self.mask)

    @torch.no_grad()
    def edit_grad(self, decay: float) -> None:
        """Gradient edit between backward and step, on unscaled gradients.

        MaxQ and SR-STE add the SR-STE decay ``decay·(1 − clamp(S, 0, 1))·W``; one-shot masks the
        gradient (its mask is binary) so pruned weights stay pruned.
        """
        grad = self.weight.grad
        if grad is None or not self.is_sparse:
            return
        if self.method == 'oneshot':
            grad.mul_(self.mask)
        elif decay:
            grad.addcmul_(self.weight, self.mask.clamp(0.0, 1.0).neg_().add_(1.0), value=decay)

    @torch.no_grad()
    def after_step(self) -> None:
        """One-shot re-applies its fixed mask to the weights after the optimizer step."""
        if self.method == 'oneshot' and self.is_sparse:
            self.weight.mul_(self.mask)

    @torch.no_grad()
    def folded_weight(self) -> Tensor:
        """The deployable weight ``W ⊙ S`` (exact zeros where the mask is 0)."""
        return (self.weight * self.mask).detach() if self.is_sparse else self.weight.detach().clone()

    def fold_spec(self) -> FoldSpec:
        """The layer's N:M pattern, or dense with the reason."""
        return FoldSpec(self.method, self.pattern if self.is_sparse else Dense(self.dense_reason))

    def extra_repr(self) -> str:  # noqa: D102
        info = f'{self.pattern}' if self.is_sparse else f'dense: {self.dense_reason}'
        return f'{super().extra_repr()}, {self.method} {info}'


class _NMConv2d(NMSparseMixin, nn.Conv2d):

    def __init__(self, *args, n: int = 2, m: int = 4, tau: float = 0.01,
                 incompatible: str = 'dense', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_nm(n, m, tau, incompatible)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(x, self.sparse_weight(), self.bias)


class _NMLinear(NMSparseMixin, nn.Linear):

    def __init__(self, *args, n: int = 2, m: int = 4, tau: float = 0.01,
                 incompatible: str = 'dense', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_nm(n, m, tau, incompatible)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return F.linear(x, self.sparse_weight(), self.bias)


@MODELS.register_module()
class MaxQConv2d(_NMConv2d):
    """Conv2d with the MaxQ multi-axis soft N:M mask.

    Args:
        *args: ``nn.Conv2d`` arguments.
        n (int): Non-zeros per block of ``m`` input channels. Defaults to 2.
        m (int): Block length. Defaults to 4.
        tau (float): Temperature of the soft scores. Defaults to 0.01.
        incompatible (str): ``'dense'`` keeps a layer that cannot take the pattern (3 input channels,
            ``groups > 1``, channels not divisible by ``m``) dense and reports it; ``'error'`` raises.
            Defaults to ``'dense'``.
    """

    method = 'maxq'


@MODELS.register_module()
class MaxQLinear(_NMLinear):
    """Linear layer with the MaxQ soft N:M mask (filter axis only). Arguments as :class:`MaxQConv2d`."""

    method = 'maxq'


@MODELS.register_module()
class SRSTEConv2d(_NMConv2d):
    """SR-STE baseline: hard top-N mask recomputed every step, straight-through gradient."""

    method = 'srste'


@MODELS.register_module()
class SRSTELinear(_NMLinear):
    """SR-STE baseline for linear layers."""

    method = 'srste'


@MODELS.register_module()
class OneShotNMConv2d(_NMConv2d):
    """One-shot magnitude N:M (ASP): mask fixed from the loaded weights, gradients and weights masked."""

    method = 'oneshot'


@MODELS.register_module()
class OneShotNMLinear(_NMLinear):
    """One-shot magnitude N:M for linear layers."""

    method = 'oneshot'
