"""Per-layer and whole-model sparsity report, and a pattern verifier for any state dict."""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .blocks import BlockPattern, BlockViolation, block_violations, is_block
from .patterns import NMPattern, to_blocks


@dataclass
class LayerStat:
    """One row of the sparsity report."""

    name: str
    shape: tuple
    pattern: str            # 'N:M', or 'dense'
    reason: Optional[str]   # why the layer is dense, when it is
    numel: int
    zeros: int
    max_nnz: Optional[int]  # largest non-zero count of any N:M block, for N:M layers

    @property
    def sparsity(self) -> float:
        """Share of exact zeros in the (folded) weight."""
        return self.zeros / max(self.numel, 1)


def is_nm(pattern: str) -> bool:
    """Whether a pattern string is an N:M pattern like ``'2:4'``."""
    return re.fullmatch(r'\d+:\d+', pattern) is not None


def _stat(name: str, weight: Tensor, pattern: str, reason: Optional[str]) -> LayerStat:
    weight = weight.detach()
    max_nnz = None
    if is_nm(pattern):
        max_nnz = int((to_blocks(weight, NMPattern.parse(pattern).m) != 0).sum(dim=1).max().item())
    return LayerStat(name, tuple(weight.shape), pattern, reason, weight.numel(),
                     int((weight == 0).sum().item()), max_nnz)


def model_report(model: nn.Module) -> List[LayerStat]:
    """Report every conv and linear layer of ``model``; compressed layers report their folded weight.

    A compressed layer provides ``folded_weight()`` and ``fold_info()`` (see :mod:`mmsparse.export`).
    """
    stats = []
    for name, module in model.named_modules():
        if hasattr(module, 'fold_info'):
            info = module.fold_info()
            stats.append(_stat(name, module.folded_weight(), info['pattern'], info.get('reason')))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            stats.append(_stat(name, module.weight, 'dense', 'not converted'))
    return stats


def overall_sparsity(stats: Iterable[LayerStat]) -> float:
    """Share of zeros over all reported weights."""
    stats = list(stats)
    return sum(s.zeros for s in stats) / max(sum(s.numel for s in stats), 1)


def format_report(stats: List[LayerStat]) -> str:
    """Human-readable table of :func:`model_report` rows plus a total line."""
    rows = [('layer', 'shape', 'pattern', 'zeros', 'max nnz/block')]
    for s in stats:
        pattern = s.pattern if s.reason is None else f'dense: {s.reason}'
        rows.append((s.name, 'x'.join(map(str, s.shape)), pattern, f'{s.sparsity:.2%}',
                     '-' if s.max_nnz is None else str(s.max_nnz)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    sparse = sum(s.reason is None for s in stats)
    lines.append(f'{len(stats)} layers, {sparse} compressed; overall weight sparsity '
                 f'{overall_sparsity(stats):.2%}')
    return '\n'.join(lines)


@dataclass
class Violation:
    """A block that breaks its declared N:M pattern."""

    layer: str
    block: tuple     # (out channel, kernel row, kernel col, first input channel) or (out, first in)
    nonzeros: int
    pattern: str

    def __str__(self) -> str:
        return (f'{self.layer}: block {self.block} has {self.nonzeros} non-zeros, pattern '
                f'{self.pattern} allows {NMPattern.parse(self.pattern).n}')


def nm_violations(name: str, weight: Tensor, pattern: NMPattern, limit: int = 10) -> List[Violation]:
    """Blocks of ``weight`` with more than ``pattern.n`` non-zeros (at most ``limit`` of them)."""
    nnz = (to_blocks(weight.detach(), pattern.m) != 0).sum(dim=1)
    bad = torch.nonzero(nnz > pattern.n).flatten()[:limit].tolist()
    if weight.dim() == 4:
        o, i, kh, kw = weight.shape
        blocks_per_pos = i // pattern.m
        coords = [(b // (kh * kw * blocks_per_pos), b // (kw * blocks_per_pos) % kh,
                   b // blocks_per_pos % kw, b % blocks_per_pos * pattern.m) for b in bad]
    else:
        blocks_per_row = weight.shape[1] // pattern.m
        coords = [(b // blocks_per_row, b % blocks_per_row * pattern.m) for b in bad]
    return [Violation(name, c, int(nnz[b]), str(pattern)) for c, b in zip(coords, bad)]


def verify_state_dict(state_dict: Mapping[str, Tensor],
                      patterns: Dict[str, str]) -> List[Union[Violation, BlockViolation]]:
    """Check ``{layer name: pattern}`` on the ``<layer>.weight`` tensors of a state dict.

    Patterns are N:M (``'2:4'``: at most N non-zeros per block of M input channels) or block
    (``'block16'``: 16×16 tiles of the 2-D view; ``'block16@0.7'``: and at least 70% of them exactly
    zero, see :mod:`mmsparse.core.blocks`). Other strings (``'dense'``) are not checked.

    Raises:
        KeyError: when a declared layer has no weight in the state dict.
    """
    violations = []
    for layer, text in patterns.items():
        if not (is_nm(text) or is_block(text)):
            continue
        key = f'{layer}.weight'
        if key not in state_dict:
            raise KeyError(f'pattern declared for {layer!r} but {key!r} is not in the checkpoint')
        if is_nm(text):
            violations += nm_violations(layer, state_dict[key], NMPattern.parse(text))
        else:
            violations += block_violations(layer, state_dict[key], BlockPattern.parse(text))
    return violations
