"""Per-layer and whole-model sparsity report, and the pattern verifier for any state dict."""
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional

from torch import Tensor, nn

from .patterns import NMPattern, to_blocks
from .spec import CompressedLayer, FoldSpec


@dataclass
class LayerStat:
    """One row of the sparsity report."""

    name: str
    shape: tuple
    pattern: str            # the pattern as recorded ('1:16', 'block16@0.7', 'w4a8'), or 'dense'
    reason: Optional[str]   # why the layer is dense, when it is
    numel: int
    zeros: int
    max_nnz: Optional[int]  # largest non-zero count of any N:M block, for N:M layers

    @property
    def sparsity(self) -> float:
        """Share of exact zeros in the (folded) weight."""
        return self.zeros / max(self.numel, 1)


def layer_stat(name: str, weight: Tensor, spec: Optional[FoldSpec]) -> LayerStat:
    """The report row of one weight; ``spec=None`` for a layer no method converted."""
    weight = weight.detach()
    pattern = spec.pattern if spec is not None else None
    max_nnz = None
    if isinstance(pattern, NMPattern):
        max_nnz = int((to_blocks(weight, pattern.m) != 0).sum(dim=1).max().item())
    return LayerStat(name, tuple(weight.shape), 'dense' if spec is None else str(pattern),
                     'not converted' if spec is None else spec.reason, weight.numel(),
                     int((weight == 0).sum().item()), max_nnz)


def model_report(model: nn.Module) -> List[LayerStat]:
    """Report every conv and linear layer of ``model``; compressed layers report their folded weight."""
    stats = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            stats.append(layer_stat(name, module.folded_weight(), module.fold_spec()))
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            stats.append(layer_stat(name, module.weight, None))
    return stats


def state_dict_report(state_dict: Mapping[str, Tensor],
                      specs: Mapping[str, FoldSpec]) -> List[LayerStat]:
    """Report rows of a (folded) state dict: declared layers plus every other 2-D/4-D weight."""
    rows = []
    for key, value in state_dict.items():
        if not key.endswith('.weight') or not isinstance(value, Tensor) or value.dim() not in (2, 4):
            continue
        name = key[:-len('.weight')]
        rows.append(layer_stat(name, value, specs.get(name)))
    return rows


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


def verify_state_dict(state_dict: Mapping[str, Tensor], specs: Mapping[str, FoldSpec]) -> list:
    """Every violation of the declared ``{layer: FoldSpec}`` by the ``<layer>.weight`` tensors.

    N:M patterns: at most N non-zeros per block of M input channels; block patterns: B×B tiles, and
    at least the declared share of them exactly zero (:mod:`mmsparse.core.blocks`); quantization
    grids: integer codes in range (:mod:`mmsparse.core.quant`); dense layers are not checked.

    Raises:
        KeyError: when a declared (non-dense) layer has no weight in the state dict.
    """
    violations = []
    for layer, spec in specs.items():
        if spec.dense:
            continue
        key = f'{layer}.weight'
        if key not in state_dict:
            raise KeyError(f'pattern declared for {layer!r} but {key!r} is not in the checkpoint')
        violations += spec.pattern.violations(layer, state_dict[key])
    return violations
