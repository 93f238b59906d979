"""N:M sparse conv and linear layers: MaxQ and its two baselines (SR-STE, one-shot magnitude).

The layers are the :mod:`mmsparse.core.layers` scaffolds with the N:M family mixin: the only state
added to the plain torch layer is the persistent ``mask`` buffer. Masks are set by
:class:`~mmsparse.maxq.MaxQHook` from the runner's progress (never from a counter inside the layer);
the layer only applies them. Each method overrides what differs: its mask (:meth:`compute_mask`),
and for one-shot the gradient and weight masking.
"""
from typing import Optional

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.layers import CompressedConv2d, CompressedLinear, PatternLayer
from ..core.masks import decay_pruned_, hard_nm_mask
from ..core.patterns import NMPattern, nm_incompatibility
from ..core.spec import Dense, FoldSpec
from ..core.ste import mask_ste
from .mask import maxq_mask


class NMSparseMixin(PatternLayer):
    """The N:M family: pattern, dense-by-rule check, mask buffer, SR-STE decay, folding.

    Methods override :meth:`compute_mask` (and one-shot the gradient and weight masking).
    """

    compression_state = ('mask',)
    #: whether the mask follows the weights every step (one-shot keeps its first mask)
    recompute_each_step = True
    weight: nn.Parameter
    mask: Tensor

    def init_compression(self, n: int = 2, m: int = 4, tau: float = 0.01,
                         incompatible: str = 'dense') -> None:
        """See :class:`MaxQConv2d` for the options."""
        if tau <= 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        self.pattern = NMPattern(n, m)
        self.tau = tau
        self.set_dense_reason(nm_incompatibility(self, m), incompatible,
                              f'the {self.pattern} pattern')
        self.register_buffer('mask', torch.ones_like(self.weight, requires_grad=False))
        self._mask_key = None

    def compute_mask(self, preserve: float, out: Optional[Tensor] = None,
                     checked: bool = False) -> Tensor:
        """The mask for the current weights at preserve rate ``preserve`` (pure function), written
        into ``out`` when given.

        Raises ``ValueError`` if the weight holds NaN or inf (``out`` is then left as it was), unless
        the caller has ``checked`` it (the tensor-op path then reads nothing back from the device).
        """
        raise NotImplementedError

    def mask_is_current(self, preserve: float) -> bool:
        """Whether the stored mask belongs to the current weights (their in-place version counter
        and storage) and ``preserve``, e.g. for frozen stages once the schedule has ended."""
        return (preserve, self.weight._version, self.weight.data_ptr()) == self._mask_key

    @torch.no_grad()
    def refresh_mask(self, preserve: float, checked: bool = False) -> None:
        """Recompute the stored mask from the current weights, unless :meth:`mask_is_current`.

        ``checked``: the caller has verified that the weight is finite (see :meth:`compute_mask`).
        """
        if self.is_sparse and not self.mask_is_current(preserve):
            self.compute_mask(preserve, out=self.mask, checked=checked)
            self._mask_key = (preserve, self.weight._version, self.weight.data_ptr())

    def layer_weight(self) -> Tensor:
        """``W ⊙ S`` with a straight-through gradient to ``W``."""
        if not self.is_sparse:
            return self.weight
        return mask_ste(self.weight, self.mask)

    @torch.no_grad()
    def edit_grad(self, decay: float) -> None:
        """Gradient edit between backward and step, on unscaled gradients: the SR-STE decay
        ``decay·(1 − clamp(S, 0, 1))·W``."""
        grad = self.weight.grad
        if grad is not None and self.is_sparse and decay:
            decay_pruned_(grad, self.weight, self.mask, decay)

    def after_step(self) -> None:
        """Runs after the optimizer step (nothing for masks that follow the weights)."""

    @torch.no_grad()
    def folded_weight(self) -> Tensor:
        """The deployable weight ``W ⊙ S`` (exact zeros where the mask is 0)."""
        return (self.weight * self.mask).detach() if self.is_sparse else self.weight.detach().clone()

    def fold_spec(self) -> FoldSpec:
        """The layer's N:M pattern, or dense with the reason."""
        return FoldSpec(self.method, self.pattern if self.is_sparse else Dense(self.dense_reason))

    def compression_repr(self) -> str:  # noqa: D102
        return f'{self.pattern}' if self.is_sparse else f'dense: {self.dense_reason}'


class MaxQMixin(NMSparseMixin):
    """MaxQ: hard N:M mask times the multi-axis soft scores, with a gradual share of N:M blocks."""

    method = 'maxq'

    @torch.no_grad()
    def compute_mask(self, preserve: float, out: Optional[Tensor] = None,  # noqa: D102
                     checked: bool = False) -> Tensor:
        return maxq_mask(self.weight, self.pattern.n, self.pattern.m, preserve, self.tau, out,
                         checked)


class SRSTEMixin(NMSparseMixin):
    """SR-STE: hard top-N mask recomputed every step (same gradual share of N:M blocks)."""

    method = 'srste'

    @torch.no_grad()
    def compute_mask(self, preserve: float, out: Optional[Tensor] = None,  # noqa: D102
                     checked: bool = False) -> Tensor:
        return hard_nm_mask(self.weight, self.pattern.n, self.pattern.m, preserve, out, checked)


class OneShotNMMixin(NMSparseMixin):
    """One-shot magnitude N:M (ASP): the mask of the loaded weights, kept; gradients and weights
    masked every step so pruned weights stay pruned."""

    method = 'oneshot'
    recompute_each_step = False

    @torch.no_grad()
    def compute_mask(self, preserve: float, out: Optional[Tensor] = None,  # noqa: D102
                     checked: bool = False) -> Tensor:
        return hard_nm_mask(self.weight, self.pattern.n, self.pattern.m, out=out, checked=checked)

    @torch.no_grad()
    def edit_grad(self, decay: float) -> None:
        """Mask the gradient (the mask is binary); no decay."""
        if self.weight.grad is not None and self.is_sparse:
            self.weight.grad.mul_(self.mask)

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-apply the fixed mask to the weights."""
        if self.is_sparse:
            self.weight.mul_(self.mask)


@MODELS.register_module()
class MaxQConv2d(MaxQMixin, CompressedConv2d):
    """Conv2d with the MaxQ multi-axis soft N:M mask.

    Args:
        *args: ``nn.Conv2d`` arguments.
        n (int): Non-zeros per block of ``m`` input channels. Defaults to 2.
        m (int): Block length. Defaults to 4.
        tau (float): Temperature of the soft scores. Defaults to 0.01.
        incompatible (str): ``'dense'`` keeps a layer that cannot take the pattern (3 input channels,
            ``groups > 1``, channels not divisible by ``m``) dense and reports it; ``'error'`` raises.
            Defaults to ``'dense'``.
        **kwargs: ``nn.Conv2d`` keyword arguments.
    """


@MODELS.register_module()
class MaxQLinear(MaxQMixin, CompressedLinear):
    """Linear layer with the MaxQ soft N:M mask (filter axis only). Arguments as :class:`MaxQConv2d`."""


@MODELS.register_module()
class SRSTEConv2d(SRSTEMixin, CompressedConv2d):
    """SR-STE baseline. Arguments as :class:`MaxQConv2d` (``tau`` unused)."""


@MODELS.register_module()
class SRSTELinear(SRSTEMixin, CompressedLinear):
    """SR-STE baseline for linear layers."""


@MODELS.register_module()
class OneShotNMConv2d(OneShotNMMixin, CompressedConv2d):
    """One-shot magnitude N:M (ASP). Arguments as :class:`MaxQConv2d` (``tau`` unused)."""


@MODELS.register_module()
class OneShotNMLinear(OneShotNMMixin, CompressedLinear):
    """One-shot magnitude N:M for linear layers."""
