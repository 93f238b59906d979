"""Block-sparse conv and linear layers: SequentialAttention++ and magnitude baselines (ACDC, one-shot).

The layers are the :mod:`mmsparse.core.layers` scaffolds with the block family mixin. The weight's
2-D view (SPEC §3,
``W.permute(0, 2, 3, 1).reshape(O, kh·kw·I)``) is tiled into B×B blocks; the extra state is

* ``support``: persistent ``(O/B, K/B)`` buffer, 1 for kept and 0 for pruned blocks;
* ``block_logits`` (SA++ only): trainable ``(O/B, K/B)`` parameter, initialised at 0, created at build
  time so the optimizer sees it.

The layer computes ``conv(x, W ⊙ expand(scale ⊙ support))`` with ``scale = n_blocks·softmax(L)``
(the softmax runs over *all* blocks of the layer, pruned ones included, so pruning a block leaves the
other blocks' scales unchanged; magnitude layers use ``scale = 1``). The support and whether the logits
are frozen are set by :class:`~mmsparse.sapp.SequentialAttentionHook` from the runner's progress.
"""
import math

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn

from ..core.blocks import (BlockPattern, block_grid, block_incompatibility, block_multiply,
                           block_multiply_, block_norms, expand_block_mask)
from ..core.layers import CompressedConv2d, CompressedLinear, PatternLayer
from ..core.masks import smallest_indices
from ..core.spec import Dense, FoldSpec


class BlockSparseMixin(PatternLayer):
    """The block family: tiling, dense-by-rule check, support buffer, scale, selection, folding.

    ``uses_attention`` decides whether the layer owns block logits and selects blocks by attention
    (SA++) or by block magnitude (ACDC, one-shot).
    """

    uses_attention: bool = False
    compression_state = ('support',)
    weight: nn.Parameter
    support: Tensor

    def init_compression(self, block_size: int = 16, min_blocks: int = 100,
                         incompatible: str = 'dense') -> None:
        """See :class:`SAPPConv2d` for the options."""
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f'block_size must be a positive integer, got {block_size!r}')
        if not isinstance(min_blocks, int) or min_blocks < 1:
            raise ValueError(f'min_blocks must be a positive integer, got {min_blocks!r}')
        self.block_size = block_size
        self.min_blocks = min_blocks
        self.set_dense_reason(block_incompatibility(self, block_size, min_blocks), incompatible,
                              f'{block_size}x{block_size} blocks')
        # Set by the hook from the progress (not persisted: a pure function of the phase).
        self.logits_frozen = False
        self._pruned_key, self._pruned = None, 0
        if not self.is_sparse:
            self.register_parameter('block_logits', None)
            self.register_buffer('support', None)
            return
        grid = block_grid(self.weight.shape, block_size)
        self.register_buffer('support', torch.ones(grid, dtype=self.weight.dtype,
                                                   device=self.weight.device))
        if self.uses_attention:
            self.block_logits = nn.Parameter(torch.zeros(grid, dtype=self.weight.dtype,
                                                         device=self.weight.device))
        else:
            self.register_parameter('block_logits', None)

    # -- state ----------------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        """Number of blocks of the layer (0 for dense layers)."""
        return self.support.numel() if self.is_sparse else 0

    @property
    def n_pruned(self) -> int:
        """Number of pruned blocks.

        Counted again only when the support changed (its in-place version counter or storage), so
        the per-step phase machine does not synchronise on a count per layer.
        """
        if not self.is_sparse:
            return 0
        key = (self.support._version, self.support.data_ptr())
        if key != self._pruned_key:
            self._pruned, self._pruned_key = int((self.support == 0).sum().item()), key
        return self._pruned

    @property
    def block_sparsity(self) -> float:
        """Share of pruned blocks."""
        return self.n_pruned / self.n_blocks if self.is_sparse else 0.0

    def attention(self) -> Tensor:
        """``softmax(L)`` over all blocks, shape ``(R, C)`` (uniform for magnitude layers)."""
        if self.block_logits is None:
            return torch.full_like(self.support, 1.0 / self.n_blocks)
        return torch.softmax(self.block_logits.detach().flatten(), 0).reshape(self.support.shape)

    def attention_entropy(self) -> float:
        """Entropy of the attention over the surviving blocks, normalised to [0, 1] by ``log(n)``."""
        keep = self.support.flatten() != 0
        n = int(keep.sum())
        if self.block_logits is None or n <= 1:
            return 1.0
        p = torch.softmax(self.block_logits.detach().flatten()[keep].double(), 0)
        return float(-(p * p.clamp_min(1e-300).log()).sum() / math.log(n))

    def block_scale(self) -> Tensor:
        """``n_blocks·softmax(L)`` (mean 1), or ones for magnitude layers; detached when frozen."""
        if self.block_logits is None:
            return torch.ones_like(self.support)
        logits = self.block_logits.detach() if self.logits_frozen else self.block_logits
        return self.n_blocks * torch.softmax(logits.flatten(), 0).reshape(logits.shape)

    def layer_weight(self) -> Tensor:
        """The effective weight ``W ⊙ scale ⊙ support`` (ordinary autograd to W and the logits)."""
        if not self.is_sparse:
            return self.weight
        return block_multiply(self.weight, self.block_scale() * self.support, self.block_size)

    # -- selection (called by the hook) ---------------------------------------------------------
    @torch.no_grad()
    def block_scores(self) -> Tensor:
        """Selection scores per block: attention ``softmax(L)`` or the block's Frobenius norm of W."""
        if self.uses_attention:
            return self.attention()
        return block_norms(self.weight, self.block_size)

    @torch.no_grad()
    def prune_to(self, n_pruned: int) -> int:
        """Zero the lowest-score surviving blocks until ``n_pruned`` blocks are pruned.

        Pruned blocks stay pruned (the support only shrinks); ties go to the lower block index.
        Returns the number of blocks newly pruned.
        """
        if not self.is_sparse:
            return 0
        n_pruned = min(max(int(n_pruned), 0), self.n_blocks)
        extra = n_pruned - self.n_pruned
        if extra <= 0:
            return 0
        flat = self.support.view(-1)
        scores = self.block_scores().flatten().to(torch.float64, copy=True).masked_fill_(flat == 0,
                                                                              math.inf)
        flat[smallest_indices(scores, extra)] = 0
        self.apply_support()
        return extra

    @torch.no_grad()
    def release(self) -> Tensor:
        """Make every block trainable again (DENSE phase); return the weight-shaped revived mask."""
        if not self.is_sparse:
            return torch.zeros_like(self.weight, dtype=torch.bool)
        revived = expand_block_mask(self.support == 0, self.weight.shape, self.block_size)
        self.support.fill_(1)
        return revived

    @torch.no_grad()
    def apply_support(self) -> None:
        """Set pruned weights to exact zero (pruning is hard, as in ACDC; idempotent), in place."""
        if self.is_sparse and self.n_pruned:
            keep = (self.support != 0).to(self.weight.dtype)
            block_multiply_(self.weight, keep, self.block_size)

    # -- export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def folded_weight(self) -> Tensor:
        """The deployable weight ``W ⊙ scale ⊙ support`` with exact zero blocks."""
        if not self.is_sparse:
            return self.weight.detach().clone()
        keep = expand_block_mask(self.support != 0, self.weight.shape, self.block_size)
        scaled = self.weight.detach() * expand_block_mask(self.block_scale().detach(),
                                                          self.weight.shape, self.block_size)
        return torch.where(keep, scaled, torch.zeros_like(scaled))

    def fold_spec(self) -> FoldSpec:
        """``block<B>@<share of zero blocks>``, or dense with the reason.

        The share is truncated to 6 decimals, so verification checks that the folded weight has
        exactly the pruned blocks' count of all-zero blocks or more (exact below 10⁶ blocks).
        """
        if not self.is_sparse:
            return FoldSpec(self.method, Dense(self.dense_reason))
        share = math.floor(self.block_sparsity * 1e6) / 1e6
        return FoldSpec(self.method, BlockPattern(self.block_size, share))

    def compression_repr(self) -> str:  # noqa: D102
        return (f'block {self.block_size}, {self.n_blocks} blocks' if self.is_sparse
                else f'dense: {self.dense_reason}')


class SAPPMixin(BlockSparseMixin):
    """SequentialAttention++: blocks selected by a trainable softmax attention over them."""

    method = 'sapp'
    uses_attention = True
    compression_state = ('support', 'block_logits')


class MagnitudeBlockMixin(BlockSparseMixin):
    """Blocks selected by magnitude (ACDC and one-shot baselines; no logits)."""

    method = 'magnitude'


@MODELS.register_module()
class SAPPConv2d(SAPPMixin, CompressedConv2d):
    """Conv2d with SequentialAttention++ block attention: ``W ⊙ n·softmax(L) ⊙ support``.

    Args:
        *args: ``nn.Conv2d`` arguments.
        block_size (int): Side B of the square blocks of the 2-D weight view. Defaults to 16.
        min_blocks (int): Layers with fewer blocks stay dense (the paper prunes layers with at least
            100 blocks). Defaults to 100.
        incompatible (str): ``'dense'`` keeps a layer that cannot be tiled (view sides not multiples of
            B, ``groups > 1``, fewer than ``min_blocks`` blocks) dense and reports why; ``'error'``
            raises. Defaults to ``'dense'``.
        **kwargs: ``nn.Conv2d`` keyword arguments.
    """


@MODELS.register_module()
class SAPPLinear(SAPPMixin, CompressedLinear):
    """Linear layer with SequentialAttention++ block attention. Arguments as :class:`SAPPConv2d`."""


@MODELS.register_module()
class MagnitudeBlockConv2d(MagnitudeBlockMixin, CompressedConv2d):
    """Block-sparse Conv2d selected by block magnitude (ACDC and one-shot baselines; no logits).

    Arguments as :class:`SAPPConv2d`.
    """


@MODELS.register_module()
class MagnitudeBlockLinear(MagnitudeBlockMixin, CompressedLinear):
    """Block-sparse Linear selected by block magnitude. Arguments as :class:`SAPPConv2d`."""
