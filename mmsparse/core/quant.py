"""Quantization grids of folded weights: the typed pattern of quantized layers, and its checks.

A quantized layer's folded weight is ``code · weight_scale`` (one scale per output channel, or one
for the tensor) with integer codes in ``[−(2^(b−1)−1), 2^(b−1)−1]``. :class:`QuantGrid` records the
grid (it is written into the fold meta under the layer's entry, so the grid can be checked, and the
input quantization rebuilt, outside mmsparse), verifies a weight against it and stores the codes.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_PATTERN = re.compile(r'w(\d+)a(\d+)')
_GRID_CHECK_MAX_BITS = 16  # 32-bit codes exceed float32's 24-bit significand: no grid to check


@dataclass
class GridViolation:
    """A quantized layer whose folded weights are not on its declared ``bits``-bit grid."""

    layer: str
    bits: int
    off_grid: int        # weights with |w / scale - round(w / scale)| above the tolerance
    max_offset: float    # the largest such distance, in units of the scale
    out_of_range: int    # codes outside [-(2^(bits-1) - 1), 2^(bits-1) - 1]

    def __str__(self) -> str:
        return (f'{self.layer}: {self.off_grid} weight(s) off the {self.bits}-bit grid (up to '
                f'{self.max_offset:.3g} of a step), {self.out_of_range} code(s) out of range')


@dataclass(frozen=True)
class QuantGrid:
    """Weights on a ``bits_w``-bit grid of step ``weight_scale``; inputs quantized to ``bits_a``.

    Args:
        bits_w (int): Weight bit width.
        bits_a (int): Input bit width (32: inputs not quantized).
        weight_scale (tuple[float], optional): Grid step per output channel (one value for a
            per-tensor range). ``None`` only for meta written before grids were recorded: such a
            layer cannot be verified.
        act_scale (float, optional): Step of the input grid; ``None`` when inputs are not quantized.
        act_signed (bool): Whether the input range is ``[−β, β]`` (else ``[0, β]``).
    """

    bits_w: int
    bits_a: int
    weight_scale: Optional[Tuple[float, ...]] = None
    act_scale: Optional[float] = None
    act_signed: bool = False

    @classmethod
    def parse(cls, text: str, entry: Optional[dict] = None) -> Optional['QuantGrid']:
        """The grid of a ``'w<bits_w>a<bits_a>'`` pattern and its meta entry, or ``None``."""
        found = _PATTERN.fullmatch(text)
        if found is None:
            return None
        entry = entry or {}
        scale = entry.get('weight_scale')
        return cls(int(found.group(1)), int(found.group(2)),
                   None if scale is None else tuple(float(v) for v in scale),
                   entry.get('act_scale'), bool(entry.get('act_signed', False)))

    def __str__(self) -> str:
        return f'w{self.bits_w}a{self.bits_a}'

    @property
    def code_max(self) -> int:
        """Largest weight code magnitude."""
        return 2 ** (self.bits_w - 1) - 1

    def meta(self) -> dict:
        """The plain values recorded beside the pattern in the fold meta."""
        return dict(bits_w=self.bits_w, bits_a=self.bits_a,
                    weight_scale=None if self.weight_scale is None else list(self.weight_scale),
                    act_scale=self.act_scale, act_signed=self.act_signed)

    def density(self, weight: Tensor) -> float:
        """Quantized weights keep every value: the whole weight is computed."""
        return 1.0

    @property
    def packable(self) -> bool:
        """Whether the weight has an integer storage (codes up to 16 bits, grid recorded)."""
        return self.bits_w <= _GRID_CHECK_MAX_BITS and self.weight_scale is not None

    def _scale(self, weight: Tensor) -> Tensor:
        return torch.tensor(self.weight_scale, dtype=torch.float64).view(
            -1, *([1] * (weight.dim() - 1)))

    def violations(self, layer: str, weight: Tensor) -> List[GridViolation]:
        """Whether ``weight = code · weight_scale`` with integer codes in range.

        The tolerance on integrality, ``1e-3 + 2^-20 · code_max`` of a step, covers float32
        rounding of the quantized values (measured: 2e-5 at 8 bits, 9e-3 at 16 bits) and is far
        below the up to 0.5 of an unquantized weight. Layers above 16 bits are not checked (their
        codes do not fit float32).

        Raises:
            ValueError: the grid has no ``weight_scale`` (meta written before it existed).
        """
        if self.bits_w > _GRID_CHECK_MAX_BITS:
            return []
        if self.weight_scale is None:
            raise ValueError(f'{layer}: pattern {self} needs weight_scale in the fold meta to be '
                             'verified')
        codes = weight.detach().double() / self._scale(weight)
        offset = (codes - codes.round()).abs()
        off = offset > 1e-3 + 2.0 ** -20 * self.code_max
        out = codes.round().abs() > self.code_max
        if off.any() or out.any():
            return [GridViolation(layer, self.bits_w, int(off.sum()), float(offset.max()),
                                  int(out.sum()))]
        return []

    def pack(self, weight: Tensor) -> Dict[str, Tensor]:
        """Integer codes (int8 up to 8 bits, int16 up to 16) and the scales (float64, as recorded).

        Raises:
            ValueError: the weight is off its grid, or wider than 16 bits (no integer storage).
        """
        if self.bits_w > _GRID_CHECK_MAX_BITS:
            raise ValueError(f'{self}: codes wider than 16 bits have no integer storage')
        bad = self.violations('weight', weight)
        if bad:
            raise ValueError(f'weight is off its {self} grid ({bad[0]}); fold and verify it first')
        codes = (weight.detach().double() / self._scale(weight)).round()
        dtype = torch.int8 if self.bits_w <= 8 else torch.int16
        return dict(codes=codes.to(dtype).contiguous(),
                    scale=torch.tensor(self.weight_scale, dtype=torch.float64))

    def stored_nbytes(self, weight: Tensor, value_bytes: int) -> int:
        """Bytes of :meth:`pack` output: one int8/int16 code per weight plus the scales."""
        return weight.numel() * (1 if self.bits_w <= 8 else 2) + 8 * len(self.weight_scale or ())

    def unpack(self, tensors: Dict[str, Tensor], shape: Sequence[int]) -> Tensor:
        """The float32 weight ``code · scale`` from :meth:`pack` output (one rounding)."""
        codes = tensors['codes'].double()
        scale = tensors['scale'].double().view(-1, *([1] * (codes.dim() - 1)))
        return (codes * scale).float().reshape(shape)
