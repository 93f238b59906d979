"""The fold interface of every compressed layer: a typed spec of what its folded weight satisfies.

A compressed layer (:class:`CompressedLayer`: MaxQ / SR-STE / one-shot N:M, SA++ / ACDC blocks, CGMQ
quantization) gives ``folded_weight()``, the deployable weight, and ``fold_spec()``, a
:class:`FoldSpec` holding the method name and a typed pattern:

* :class:`~mmsparse.core.patterns.NMPattern` — at most N non-zeros per block of M input channels;
* :class:`~mmsparse.core.blocks.BlockPattern` — B×B tiles of the 2-D view, all zero or not;
* :class:`~mmsparse.core.quant.QuantGrid` — integer codes times a per-channel step;
* :class:`Dense` — the layer stays dense, with the reason.

Each pattern verifies a weight (``violations``), measures the share the runtime must compute
(``density``), records itself in the fold meta (``str`` + ``meta()``) and, when it has one, packs
the weight into its compressed storage (``pack`` / ``unpack``). Reports, fold, verify, compressed
storage, the ONNX checks and the benchmarks use these objects; the one place that reads the
pattern strings of a checkpoint's meta back is :meth:`FoldSpec.from_meta`.
"""
from dataclasses import dataclass
from typing import ClassVar, Dict, Mapping, Optional, Tuple, Union

from torch import Tensor

from .blocks import BlockPattern, is_block
from .patterns import NMPattern
from .quant import QuantGrid


@dataclass(frozen=True)
class Dense:
    """No pattern: the layer stays dense (``reason`` says why)."""

    reason: Optional[str] = None

    def __str__(self) -> str:
        return 'dense'

    def meta(self) -> dict:  # noqa: D102
        return {} if self.reason is None else dict(reason=self.reason)

    def violations(self, layer: str, weight: Tensor) -> list:  # noqa: D102
        return []

    def density(self, weight: Tensor) -> float:  # noqa: D102
        return 1.0

    packable = False


Pattern = Union[NMPattern, BlockPattern, QuantGrid, Dense]
SPARSE_PATTERNS = (NMPattern, BlockPattern)


def parse_pattern(text: str, entry: Optional[Mapping] = None) -> Pattern:
    """The typed pattern of a recorded pattern string (and its meta ``entry``).

    ``'2:4'`` → :class:`NMPattern`, ``'block16'`` / ``'block16@0.7'`` → :class:`BlockPattern`,
    ``'w4a8'`` → :class:`QuantGrid` (grid from ``entry``), ``'dense'`` → :class:`Dense`.

    Raises:
        ValueError: an unknown pattern string.
    """
    entry = dict(entry or {})
    if text == 'dense':
        return Dense(entry.get('reason'))
    if is_block(text):
        return BlockPattern.parse(text)
    grid = QuantGrid.parse(text, entry)
    if grid is not None:
        return grid
    if ':' in text:
        return NMPattern.parse(text)
    raise ValueError(f'unknown pattern {text!r}: expected "N:M", "block<B>[@<share>]", '
                     '"w<bits>a<bits>" or "dense"')


@dataclass(frozen=True)
class FoldSpec:
    """What export records for one compressed layer: its method and its typed pattern."""

    method: str
    pattern: Pattern

    @property
    def dense(self) -> bool:
        """Whether the layer stays dense (no pattern)."""
        return isinstance(self.pattern, Dense)

    @property
    def sparse(self) -> bool:
        """Whether the pattern puts exact zeros into the weight (N:M or block)."""
        return isinstance(self.pattern, SPARSE_PATTERNS)

    @property
    def reason(self) -> Optional[str]:
        """Why the layer is dense, when it is."""
        return self.pattern.reason if self.dense else None

    def to_meta(self) -> dict:
        """The layer's entry of the fold meta: ``method``, ``pattern`` string and plain fields."""
        return dict(method=self.method, pattern=str(self.pattern), **self.pattern.meta())

    @classmethod
    def from_meta(cls, entry: Mapping) -> 'FoldSpec':
        """The spec of a fold-meta entry (:meth:`to_meta`, or meta written by earlier versions)."""
        if 'pattern' not in entry:
            raise ValueError(f'fold meta entry needs a pattern, got {dict(entry)}')
        return cls(str(entry.get('method', 'unknown')), parse_pattern(str(entry['pattern']), entry))


def specs_from_meta(layers: Mapping[str, Mapping]) -> Dict[str, FoldSpec]:
    """``{layer: FoldSpec}`` of the ``layers`` entry of a fold meta."""
    return {name: FoldSpec.from_meta(entry) for name, entry in layers.items()}


def specs_from_patterns(patterns: Mapping[str, str]) -> Dict[str, FoldSpec]:
    """``{layer: FoldSpec}`` of user-given ``{layer: pattern string}`` (e.g. a CLI's)."""
    return {name: FoldSpec('declared', parse_pattern(text)) for name, text in patterns.items()}


class CompressedLayer:
    """Interface of every compressed conv / linear layer (a mixin before the scaffolds of
    :mod:`mmsparse.core.layers`).

    ``method`` names the method in reports and fold meta; ``compression_state`` lists the parameters
    and persistent buffers that hold its state (mask, gates, ranges, logits ...): folding drops
    them, checkpoint checks require them.
    """

    method: ClassVar[str] = ''
    compression_state: ClassVar[Tuple[str, ...]] = ()

    def init_compression(self, **options) -> None:
        """Create the method's state; its keyword arguments are the layer's options."""
        raise NotImplementedError

    def layer_weight(self) -> Tensor:
        """The weight the training forward computes with."""
        raise NotImplementedError

    def layer_input(self, x: Tensor) -> Tensor:
        """The input the training forward computes with (identity unless inputs are quantized)."""
        return x

    def compression_repr(self) -> str:
        """The method's part of ``extra_repr``."""
        raise NotImplementedError

    def extra_repr(self) -> str:  # noqa: D102
        return f'{super().extra_repr()}, {self.method} {self.compression_repr()}'

    def folded_weight(self) -> Tensor:
        """The deployable weight (exact zeros where pruned, quantized values on their grid)."""
        raise NotImplementedError

    def fold_spec(self) -> FoldSpec:
        """The layer's method and typed pattern."""
        raise NotImplementedError


class QuantizedLayer(CompressedLayer):
    """A compressed layer whose export carries QuantizeLinear/DequantizeLinear pairs.

    Between :meth:`prepare_qdq` and :meth:`release_qdq`, with ``qdq_export`` set, its forward emits
    the Q/DQ form and its quantized weight is the parameter named :attr:`QDQ_WEIGHT` (so the
    exporter keeps it as the initializer the weight pair reads).
    """

    QDQ_WEIGHT: ClassVar[str] = 'quantized_weight'
    qdq_export: bool = False

    def prepare_qdq(self) -> None:
        """Freeze the Q/DQ constants (quantized weight, scales, bounds) before an ONNX export."""
        raise NotImplementedError

    def release_qdq(self) -> None:
        """Drop what :meth:`prepare_qdq` added."""
        raise NotImplementedError

    def quant_input(self, x: Tensor) -> Tensor:
        """The layer's fake quantization of an input tensor."""
        raise NotImplementedError

    @property
    def quantizes_input(self) -> bool:
        """Whether the layer quantizes its input."""
        raise NotImplementedError
