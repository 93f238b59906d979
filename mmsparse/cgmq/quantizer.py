"""Nested residual quantizer over {2, 4, 8, 16, 32} bits with deterministic gates (SPEC §2).

For a clipping range ``[α, β]`` (signed: ``α = −β``; unsigned: ``α = 0``) of span ``β − α``::

    s2 = span / (2²−1),  s4 = s2 / (2²+1),  s8 = s4 / (2⁴+1),  s16 = s8 / (2⁸+1),  s32 = s16 / (2¹⁶+1)
    x_c = clip(x, α, β)
    x2  = s2 · R(x_c / s2)
    ε_b = s_b · R((x_c − x_{b/2}) / s_b)           (x_b = x_{b/2} + ε_b: the residual at scale s_b)
    x_q = x2 + z4(ε4 + z8(ε8 + z16(ε16 + z32·ε32)))

``R`` rounds to the nearest integer, ties to even, and is straight-through in the backward pass.
A signed b-bit tensor takes the symmetric integer codes ``[−(2^(b−1)−1), 2^(b−1)−1]`` (int8's
restricted range at 8 bits, zero exactly representable) and an unsigned one ``[0, 2^b−1]``; ``x2``
has the codes ``[−1, 1]`` or ``[0, 3]``, each residual ``±2^(b/2−1)``.

Computed the way ONNX ``QuantizeLinear`` computes a code: the b-bit code of the widest switched-on
level is ``c_b = clamp(R(x_c / s_b), lo, hi)``, one float division rounded half to even and clamped
to the range above (``x = ±β``, on a signed grid the tie ``±(2^(b−1) − ½)``, gets the outermost
code), and ``x_q = c_b · s_b``; the residual codes follow from ``c_b`` in integer arithmetic,
``c_{b/2} = round(c_b / (2^(b/2)+1))`` (never a tie: the divisor is odd) and
``ε_b = s_b · (c_b − (2^(b/2)+1) · c_{b/2})``. This is the decomposition above exactly, every tie
resolved so that the b-bit code is even (rounding each residual to even on its own would not be:
``x / s4 = 5.5`` would give code 5, ONNX 6), and it makes training, the folded weights and the QDQ
graph agree bit for bit: ONNX Runtime's ``QuantizeLinear`` of the same float32 values at the same
scales gives the same codes, ties or not. 32-bit codes exceed float32's integers: that level is
computed in float64.

Gates are ``z_b = 1[g_b > 0]`` with a straight-through gradient to ``g_b``; nothing is sampled, so
training and inference quantize identically.
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.ext import use_kernel

BIT_WIDTHS: Tuple[int, ...] = (2, 4, 8, 16, 32)
GATED_BITS: Tuple[int, ...] = BIT_WIDTHS[1:]  # 2 bits is the floor, gates switch 4, 8, 16, 32 on


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
    return bits_from_states((gates.detach() > 0).tolist())


def bits_from_states(on: Sequence[bool]) -> int:
    """:func:`bits_from_gates` from the on/off states ``[g4 > 0, g8 > 0, …]`` read off the device."""
    bits = 2
    for state, b in zip(on, GATED_BITS):
        if not state:
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


def _clip(x: Tensor, beta: Tensor, signed: bool) -> Tensor:
    """``clip(x, α, β)`` with ``α = −β`` (signed) or 0 (tensor bounds: nothing read to the host)."""
    return torch.minimum(torch.maximum(x, -beta if signed else torch.zeros_like(beta)), beta)


def _code(x_c: Tensor, s: List[Tensor], level: int, signed: bool) -> Tensor:
    """The code ``clamp(R(x_c / s_b), lo, hi)`` (as float) of the width ``b = BIT_WIDTHS[level]``.

    One division rounded half to even, as ONNX ``QuantizeLinear`` computes it; float64 at 32 bits.
    """
    lo, hi = code_range(BIT_WIDTHS[level], signed)
    if level == len(BIT_WIDTHS) - 1:
        return (x_c.double() / s[level].double()).round_().clamp_(lo, hi)
    return (x_c / s[level]).round_().clamp_(lo, hi)


# s_l = s_{l-1} / d_l: the (odd) multipliers 2^(b/2) + 1 from level l - 1 to level l
_MULTIPLIERS = tuple(2.0 ** b + 1.0 for b in BIT_WIDTHS[:-1])


def _split_codes(code: Tensor, level: int) -> List[Tensor]:
    """Residual codes ``q_1 … q_level`` (as float) of a level-``level`` code.

    ``q_l = c_l − d_l · c_{l−1}`` with ``c_{l−1} = round(c_l / d_l)``: exact integers with
    ``|q_l| ≤ (d_l − 1) / 2``, as ``c_l / d_l`` lies at least ``1 / (2 d_l)`` from a tie (far more
    than the error of the multiplication by ``1 / d_l``).
    """
    out = []
    for lev in range(level, 0, -1):
        d = _MULTIPLIERS[lev - 1]
        prev = code.mul(1.0 / d).round_()
        out.append(code - prev * d)
        code = prev
    return out[::-1]


# smallest integer type holding the codes of each residual level (±2, ±8, ±128, ±32768)
_CODE_DTYPES = (torch.int8, torch.int8, torch.int16, torch.int32)


def _active_levels(gates: Tensor) -> int:
    """Residual levels switched on: the length of the on-prefix of the gate chain."""
    on = (gates.detach() > 0).tolist()
    return on.index(False) if False in on else len(on)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape``."""
    extra = t.dim() - len(shape)
    t = t.sum(dim=list(range(extra))) if extra else t
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _dot_to(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """``Σ a·b`` reduced to ``shape`` (``b`` broadcast to ``a``; integer codes are converted)."""
    if len(shape) == 0 or shape.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype)).reshape(shape)
    return _sum_to(a * b, shape)


def _gate_grads(per_level: Tensor, n_on: int, gates: Tensor) -> Tensor:
    """Gate gradients from ``Σ grad · ε_l`` of the levels ``1 … n_on`` and the first off one.

    ``d x_q / d z_l = Σ_{k≥l} ε_k`` over the switched-on levels (``z_{l+1} = 0`` after the last on
    level), ``ε_l`` alone for the first switched-off level, zero beyond.
    """
    out = per_level.new_zeros(len(GATED_BITS))
    out[:n_on] = per_level[:n_on].flip(0).cumsum(0).flip(0)
    out[n_on:len(per_level)] = per_level[n_on:]
    return out.to(gates.dtype)


def _quantize_levels(x: Tensor, beta: Tensor, signed: bool, n_on: int,
                     keep_codes: bool) -> Tuple[Tensor, List[Tensor]]:
    """``x_q`` over the first ``n_on`` residual levels with tensor ops, and their codes if asked."""
    s = scales(2.0 * beta if signed else beta)
    code = _code(_clip(x, beta, signed), s, n_on, signed)
    x_q = (code * s[n_on].to(code.dtype)).to(x.dtype)
    if not keep_codes:
        return x_q, []
    return x_q, [q.to(dtype) for q, dtype in zip(_split_codes(code, n_on), _CODE_DTYPES)]


def _forward(ctx, quantize: Callable, x: Tensor, beta: Tensor, gates: Tensor, signed: bool,
             keep_codes: bool, n_on: Optional[int]) -> Tensor:
    """Forward of both quantizer Functions: ``quantize`` gives ``(x_q, codes)``; saves for backward.

    ``n_on``: the switched-on levels when the caller knows them (read from ``gates`` otherwise).
    """
    n_on = _active_levels(gates) if n_on is None else n_on
    x_q, codes = quantize(x, beta, signed, n_on, keep_codes)
    ctx.signed, ctx.n_on = signed, n_on
    ctx.save_for_backward(x, beta, gates, x_q, *codes)
    return x_q


class _NestedQuantize(torch.autograd.Function):
    """Fused nested fake-quantization, with the straight-through gradients in closed form.

    The straight-through estimator makes rounding and the code clamp (which acts only at the
    range ends) identities in the backward pass, so ``d x_q / d x_c = 1`` and, as every scale is
    proportional to β, ``d x_q / d β = (x_q − x_c) / β`` at fixed ``x_c``; the clip adds
    ``d x_c / d β = ±1`` outside ``[α, β]``. A gate's gradient is ``d x_q / d z_l = Σ_{k≥l} ε_k``
    over the switched-on levels (``ε_l`` alone for the first switched-off level, zero beyond).

    Forward records no graph and keeps ``x``, β, the gates, ``x_q`` (which the next layer keeps
    anyway) and the integer codes of the residual levels in int8/int16: a fraction of the memory and
    time of differentiating the arithmetic level by level.
    """

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor, gates: Tensor, signed: bool, keep_codes: bool,
                n_on: Optional[int] = None) -> Tensor:
        return _forward(ctx, _quantize_levels, x, beta, gates, signed, keep_codes, n_on)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, beta, gates, x_q, *codes = ctx.saved_tensors
        signed, n_on = ctx.signed, ctx.n_on
        x_c = _clip(x, beta, signed)
        grad_in = grad * (x_c == x)  # the gradient reaching x: inside [α, β], bounds included
        grad_beta = grad_gates = None
        if ctx.needs_input_grad[1]:
            # inside: (x_q − x) / β; outside: (x_q − x_c) / β ± 1 = x_q / β
            grad_beta = (_dot_to(grad, x_q, beta.shape) - _dot_to(grad_in, x, beta.shape)) / beta
        if ctx.needs_input_grad[2]:
            s = scales(2.0 * beta if signed else beta)
            # Σ grad · ε_l per level, ε_l = s_l · code_l (s_l per tensor or per channel)
            per_level = [(_dot_to(grad, code, beta.shape) * s[level]).sum()
                         for level, code in enumerate(codes, start=1)]
            if n_on < len(GATED_BITS):  # the first switched-off level: c_2b − d · c_b
                off = _code(x_c, s, n_on + 1, signed)
                off = off - _code(x_c, s, n_on, signed).to(off.dtype) * _MULTIPLIERS[n_on]
                per_level.append((_dot_to(grad, off.to(grad.dtype), beta.shape)
                                  * s[n_on + 1]).sum())
            grad_gates = _gate_grads(torch.stack(per_level), n_on, gates)
        grad_x = grad_in if ctx.needs_input_grad[0] else None
        return grad_x, grad_beta, grad_gates, None, None, None


class _NestedQuantizeKernel(torch.autograd.Function):
    """:class:`_NestedQuantize` as one compiled sweep each way (``csrc/nested_quantize.cpp``).

    Same definition and saved tensors, bit-identical ``x_q`` and gradient to ``x``; the kernel sums
    the β and gate gradients per channel in double over fixed chunks, so they do not depend on the
    number of threads.
    """

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor, gates: Tensor, signed: bool, keep_codes: bool,
                n_on: Optional[int] = None) -> Tensor:
        return _forward(ctx, torch.ops.mmsparse.nested_quantize_forward, x, beta, gates, signed,
                        keep_codes, n_on)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, beta, gates, x_q, *codes = ctx.saved_tensors
        need_x, need_beta, need_gates = ctx.needs_input_grad[:3]
        # sums (channels × (1 + levels), double): Σ grad·x_q − grad_in·x, then Σ grad·code_l of the
        # gate levels (the on ones and the first switched-off one)
        grad_x, sums = torch.ops.mmsparse.nested_quantize_backward(
            grad, x, beta, x_q, codes if need_gates else [], ctx.signed, ctx.n_on, need_x,
            need_gates)
        grad_beta = grad_gates = None
        if need_beta:
            grad_beta = (sums[:, 0] / beta.reshape(-1)).to(beta.dtype).view_as(beta)
        if need_gates:
            span = 2.0 * beta if ctx.signed else beta
            s = torch.stack(scales(span)).view(len(BIT_WIDTHS), -1)[1:sums.shape[1]]
            grad_gates = _gate_grads((sums[:, 1:] * s.T).sum(0), ctx.n_on, gates)
        return grad_x if need_x else None, grad_beta, grad_gates, None, None, None


def _kernel_applies(x: Tensor, beta: Tensor) -> bool:
    """Whether the compiled kernel serves ``x``: float32 CPU, β per tensor or per first dim."""
    if not (use_kernel(x) and use_kernel(beta)):
        return False
    if beta.numel() == 1:
        return beta.dim() <= x.dim()
    return x.dim() > 0 and beta.shape == (x.shape[0],) + (1,) * (x.dim() - 1)


def nested_quantize(x: Tensor, beta: Tensor, signed: bool, gates: Tensor,
                    bits: Optional[int] = None) -> Tensor:
    """Fake-quantize ``x`` with the nested decomposition and gates ``[g4, g8, g16, g32]``.

    float32 CPU tensors with β per tensor or per leading channel run the compiled kernel
    (``mmsparse._ext``); anything else (GPU, float64, other β layouts) runs the tensor ops.

    Args:
        x (Tensor): Values to quantize.
        beta (Tensor): Upper clipping bound, broadcastable to ``x`` (per tensor or per channel), > 0.
        signed (bool): Range ``[−β, β]`` when True, ``[0, β]`` when False.
        gates (Tensor): The four real gate variables ``g4, g8, g16, g32``.
        bits (int, optional): The width the gates give, when the caller already knows it (the
            layers cache it per gate version), so the forward reads nothing back from the device.

    Returns:
        Tensor: ``x_q`` with straight-through gradients to ``x`` (inside ``[α, β]``, bounds
        included), ``β`` and the gates. A gate's gradient is ``d x_q / d z_b`` (zero beyond the first
        switched-off level, whose residual is computed for its gate's gradient only).
    """
    keep_codes = torch.is_grad_enabled() and gates.requires_grad
    fn = _NestedQuantizeKernel if _kernel_applies(x, beta) else _NestedQuantize
    return fn.apply(x, beta, gates, signed, keep_codes,
                    None if bits is None else BIT_WIDTHS.index(bits))


def quantize_codes(x: Tensor, beta: Tensor, signed: bool, bits: int) -> Tuple[Tensor, Tensor]:
    """Integer codes and scale of ``x`` at a fixed width (no gradient), ``x_q = codes · scale``.

    Runs the same nested decomposition as :func:`nested_quantize` with the chain on up to ``bits``.
    """
    gates = torch.tensor(gate_values_for_bits(bits, 1.0), device=x.device)
    with torch.no_grad():
        x_q = nested_quantize(x, beta, signed, gates)
        span = 2.0 * beta if signed else beta
        scale = scales(span)[BIT_WIDTHS.index(bits)]
        return torch.round(x_q / scale), scale

