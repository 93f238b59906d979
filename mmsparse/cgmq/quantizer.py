"""Nested residual quantizer over {2, 4, 8, 16, 32} bits with deterministic gates (SPEC §2).

For a clipping range ``[α, β]`` (signed: ``α = −β``; unsigned: ``α = 0``) of span ``β − α``::

    s2 = span / (2²−1),  s4 = s2 / (2²+1),  s8 = s4 / (2⁴+1),  s16 = s8 / (2⁸+1),  s32 = s16 / (2¹⁶+1)
    x_c = clip(x, α, β)
    x2  = s2 · R(x_c / s2)
    ε_b = s_b · R((x_c − x_{b/2}) / s_b)           (x_b = x_{b/2} + ε_b: the residual at scale s_b)
    x_q = x2 + z4(ε4 + z8(ε8 + z16(ε16 + z32·ε32)))

``R`` rounds half toward zero and is straight-through in the backward pass. Codes are clamped to
the integer range of their level: ``x2`` to ``[−1, 1]`` (signed) or ``[0, 3]`` (unsigned), each residual
to ``±2^(b/2−1)`` (its exact mathematical range; the clamp only absorbs float noise at the range edges),
so a signed b-bit tensor takes the symmetric integer codes ``[−(2^(b−1)−1), 2^(b−1)−1]`` (int8's
restricted range at 8 bits, zero exactly representable) and an unsigned one ``[0, 2^b−1]``.

Gates are ``z_b = 1[g_b > 0]`` with a straight-through gradient to ``g_b``; nothing is sampled, so
training and inference quantize identically.
"""
from typing import List, Tuple

import torch
from torch import Tensor

BIT_WIDTHS: Tuple[int, ...] = (2, 4, 8, 16, 32)
GATED_BITS: Tuple[int, ...] = BIT_WIDTHS[1:]  # 2 bits is the floor, gates switch 4, 8, 16, 32 on


def round_half_toward_zero(x: Tensor) -> Tensor:
    """Round to the nearest integer, ties toward zero (so ``±(2^(b−1) − ½)`` maps inside the range)."""
    return torch.sign(x) * torch.ceil(x.abs() - 0.5)


def round_ste(x: Tensor) -> Tensor:
    """:func:`round_half_toward_zero` forward, identity backward."""
    return x + (round_half_toward_zero(x) - x).detach()


def gate_ste(gate: Tensor) -> Tensor:
    """``1[g > 0]`` forward (exactly 0.0 / 1.0), identity gradient to ``g`` backward."""
    return (gate > 0).to(gate.dtype) + (gate - gate.detach())  # exactly 0.0 / 1.0 forward


def scales(span: Tensor) -> List[Tensor]:
    """``[s2, s4, s8, s16, s32]`` for a clipping span (tensor, any shape)."""
    out = [span / 3.0]
    for prev_bits in BIT_WIDTHS[:-1]:
        out.append(out[-1] / (2.0 ** prev_bits + 1.0))
    return out


def code_range(bits: int, signed: bool) -> Tuple[int, int]:
    """Integer code range of a ``bits``-wide tensor: symmetric restricted for signed, full for unsigned."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def bits_from_gates(gates: Tensor) -> int:
    """Bit width of a tensor: the largest ``b`` whose gate chain ``g4 … g_b`` is all on (at least 2)."""
    bits = 2
    for on, b in zip((gates.detach() > 0).tolist(), GATED_BITS):
        if not on:
            break
        bits = b
    return bits


def gate_values_for_bits(bits: int, magnitude: float) -> List[float]:
    """Initial gate values ``[g4, g8, g16, g32]`` giving ``bits``: ``+magnitude`` on, ``−magnitude`` off."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f'bit width must be one of {BIT_WIDTHS}, got {bits!r}')
    if magnitude <= 0:
        raise ValueError(f'gate_init must be > 0, got {magnitude}')
    return [magnitude if b <= bits else -magnitude for b in GATED_BITS]


def nested_quantize(x: Tensor, beta: Tensor, signed: bool, gates: Tensor,
                    compute_off_level: bool = True) -> Tensor:
    """Fake-quantize ``x`` with the nested decomposition and gates ``[g4, g8, g16, g32]``.

    Args:
        x (Tensor): Values to quantize.
        beta (Tensor): Upper clipping bound, broadcastable to ``x`` (per tensor or per channel), > 0.
        signed (bool): Range ``[−β, β]`` when True, ``[0, β]`` when False.
        gates (Tensor): The four real gate variables ``g4, g8, g16, g32``.
        compute_off_level (bool): Also compute the residual of the first switched-off level (its
            value is multiplied by 0, but the straight-through gradient of its gate needs it).
            Levels beyond it get zero gradient and are skipped. Defaults to True.

    Returns:
        Tensor: ``x_q`` with straight-through gradients to ``x`` (inside the range), ``β`` and gates.
    """
    alpha = -beta if signed else torch.zeros_like(beta)
    span = 2.0 * beta if signed else beta
    x_c = torch.minimum(torch.maximum(x, alpha), beta)
    s = scales(span)
    lo, hi = code_range(2, signed)
    x2 = s[0] * torch.clamp(round_ste(x_c / s[0]), lo, hi)
    prev = x2
    on = (gates.detach() > 0).tolist()
    z = gate_ste(gates)
    residuals = []
    for level, bits in enumerate(GATED_BITS):
        half = 2 ** (bits // 2 - 1)
        eps = s[level + 1] * torch.clamp(round_ste((x_c - prev) / s[level + 1]), -half, half)
        residuals.append(eps)
        if not on[level]:
            if not compute_off_level:
                residuals.pop()
            break
        prev = prev + eps
    # x_q = x2 + z4(ε4 + z8(ε8 + …)), built from the innermost computed level outwards
    inner = None
    for level in reversed(range(len(residuals))):
        term = residuals[level] if inner is None else residuals[level] + inner
        inner = z[level] * term
    return x2 if inner is None else x2 + inner


def quantize_codes(x: Tensor, beta: Tensor, signed: bool, bits: int) -> Tuple[Tensor, Tensor]:
    """Integer codes and scale of ``x`` at a fixed width (no gradient), ``x_q = codes · scale``.

    Runs the same nested decomposition as :func:`nested_quantize` with the chain on up to ``bits``.
    """
    gates = torch.tensor(gate_values_for_bits(bits, 1.0), device=x.device)
    with torch.no_grad():
        x_q = nested_quantize(x, beta, signed, gates, compute_off_level=False)
        span = 2.0 * beta if signed else beta
        scale = scales(span)[BIT_WIDTHS.index(bits)]
        return torch.round(x_q / scale), scale

