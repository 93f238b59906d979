"""The compiled nested quantizer (mmsparse/csrc/nested_quantize.cpp) against the tensor-op path.

x_q and the gradient to x must be bit-identical (x_q up to the sign of zero: torch's own
vectorized ``maximum`` and its scalar tail disagree on ``max(-0.0, 0.0)``). The β and gate
gradients are sums, in double over fixed chunks in the kernel and in float32 in the tensor path:
they agree to float32 summation error, and do not change at all with the number of threads.
On exact ties both are checked against ONNX's rounding written with ``np.rint``.
"""
from typing import Optional, Tuple

import numpy as np
import pytest
import torch
from torch import Tensor

import mmsparse  # noqa: F401
from mmsparse.cgmq import BIT_WIDTHS, gate_values_for_bits, nested_quantize, scales
from mmsparse.cgmq.quantizer import _kernel_applies, _NestedQuantize, _NestedQuantizeKernel
from mmsparse.core.ext import kernels_available

pytestmark = pytest.mark.skipif(not kernels_available(), reason='mmsparse._ext is not built')

Grads = Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def _run(fn, x: Tensor, beta: Tensor, gates: Tensor, signed: bool, upstream: Tensor,
         grad_x: bool = True, grad_gates: bool = True) -> Grads:
    """``x_q`` and the gradients to x, β and the gates of ``(x_q · upstream).sum()``."""
    x = x.clone().requires_grad_(grad_x)
    beta = beta.clone().requires_grad_()
    gates = gates.clone().requires_grad_(grad_gates)
    out = fn.apply(x, beta, gates, signed, grad_gates)
    out.backward(upstream)
    return out.detach(), x.grad, beta.grad, gates.grad


def _bits(t: Tensor) -> Tensor:
    """Bit patterns of a float32 tensor, zeros as +0.0 (``+ 0.0`` changes only −0.0)."""
    return (t + 0.0).view(torch.int32)


def _specials(beta: float, signed: bool, gen: torch.Generator) -> Tensor:
    """0, ±0, ±β, just inside and outside, far outside, and rounding ties ``(k + ½) · s_l`` of every
    level (for the residual levels on top of the lower levels' ``x_q``)."""
    b = torch.tensor(beta)
    s = scales(2 * b if signed else b)
    vals = [0.0, -0.0, beta, -beta, 1.5 * beta, -3 * beta, 1e6, -1e6,
            float(torch.nextafter(b, torch.tensor(0.0))), float(torch.nextafter(b, b + 1))]
    vals += [(k + 0.5) * float(s[0]) for k in range(-3, 4)]
    vals += [k * float(s[0]) for k in range(-3, 4)]
    base = (torch.rand(6, generator=gen) * 2 - 1) * beta
    for level in range(1, len(BIT_WIDTHS)):
        gates = torch.tensor(gate_values_for_bits(BIT_WIDTHS[level - 1], 1.0))
        prev = _NestedQuantize.apply(base, b, gates, signed, False)
        half = 2 ** (BIT_WIDTHS[level] // 2 - 1)
        for k in (-half - 1, -half, -1, 0, half - 1, half):
            vals += (prev + (k + 0.5) * s[level]).tolist()  # float32, as the quantizer sees it
    return torch.tensor(vals)


def _case(shape, per_channel: bool, signed: bool, seed: int) -> Tuple[Tensor, Tensor]:
    """Random x (two-sided or mostly non-negative) with the special values in every channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 1.2
    if not signed:
        x = x.abs() - 0.1
    channels = shape[0] if per_channel else 1
    betas = torch.rand(channels, generator=gen) + 0.5
    rows = x.view(channels, -1)
    for c in range(channels):
        sp = _specials(float(betas[c]), signed, gen)
        rows[c, :sp.numel()] = sp[:rows.shape[1]]
    beta = betas.view(-1, *([1] * (len(shape) - 1))) if per_channel else betas.view(())
    return x, beta


def _assert_sum_close(got: Tensor, want: Tensor, magnitude: Tensor) -> None:
    """Sums agree to ``rtol=1e-5``, or to ``1e-7`` (about float32's unit roundoff) of the summed
    magnitudes, the scale of the tensor path's float32 summation error under cancellation."""
    assert got.shape == want.shape
    bad = (got - want).abs() > 1e-5 * want.abs() + 1e-7 * magnitude
    assert not bad.any(), f'sums differ: {got[bad]} vs {want[bad]}'


def _assert_same(kernel: Grads, tensor: Grads, upstream: Tensor, x: Tensor, beta: Tensor) -> None:
    x_q, gx, gb, gg = kernel
    assert torch.equal(_bits(x_q), _bits(tensor[0])), 'x_q differs'
    if gx is None:
        assert tensor[1] is None
    else:
        assert torch.equal(gx.view(torch.int32), tensor[1].view(torch.int32)), 'grad x differs'
    terms = upstream.abs() * (x_q.abs() + x.abs()) / beta
    per_channel = terms.flatten(1).sum(1) if beta.numel() > 1 else terms.sum()
    _assert_sum_close(gb, tensor[2], per_channel.view(beta.shape))
    if gg is None:
        assert tensor[3] is None
    else:
        _assert_sum_close(gg, tensor[3], (upstream.abs() * beta).sum())


@pytest.mark.parametrize('bits', BIT_WIDTHS)
@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('shape,per_channel', [((16, 24, 3, 3), True), ((12, 200), True),
                                               ((2, 3, 20, 20), False), ((300,), False)])
def test_kernel_matches_tensor_path(bits, signed, shape, per_channel):
    x, beta = _case(shape, per_channel, signed, seed=bits + 7 * signed)
    assert _kernel_applies(x, beta)
    gates = torch.tensor(gate_values_for_bits(bits, 0.3))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    kernel = _run(_NestedQuantizeKernel, x, beta, gates, signed, upstream)
    tensor = _run(_NestedQuantize, x, beta, gates, signed, upstream)
    _assert_same(kernel, tensor, upstream, x, beta)
    # the cases exercise clipping on both sides and a nonzero gate gradient
    x_c = x.clamp(-beta if signed else torch.zeros_like(beta), beta)
    assert (x_c != x).sum() > 2 and kernel[3].abs().sum() > 0


@pytest.mark.parametrize('gates', [[0.3, -0.2, 0.4, 0.1], [-0.1, 0.5, 0.5, 0.5],
                                   [0.2, 0.2, -0.3, 0.2]])
@pytest.mark.parametrize('grad_x,grad_gates', [(True, True), (False, True), (True, False)])
def test_kernel_gate_holes_and_partial_gradients(gates, grad_x, grad_gates):
    """Gates on beyond the first switched-off one are ignored; inputs without a gradient skip it."""
    x, beta = _case((8, 4, 3, 3), True, True, seed=3)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    g = torch.tensor(gates)
    kernel = _run(_NestedQuantizeKernel, x, beta, g, True, upstream, grad_x, grad_gates)
    tensor = _run(_NestedQuantize, x, beta, g, True, upstream, grad_x, grad_gates)
    _assert_same(kernel, tensor, upstream, x, beta)


def test_kernel_non_contiguous_upstream_and_zero_dim_beta():
    x, beta = _case((24, 16), True, True, seed=5)
    upstream = torch.randn(16, 24).t()
    gates = torch.tensor(gate_values_for_bits(8, 0.3))
    kernel = _run(_NestedQuantizeKernel, x, beta, gates, True, upstream)
    _assert_same(kernel, _run(_NestedQuantize, x, beta, gates, True, upstream), upstream, x, beta)
    x, beta = _case((4, 8, 8), False, False, seed=6)
    for b in (beta.view(()), beta.view(1), beta.view(1, 1, 1)):
        out = _run(_NestedQuantizeKernel, x, b, gates, False, torch.ones_like(x))
        ref = _run(_NestedQuantize, x, b, gates, False, torch.ones_like(x))
        assert out[2].shape == b.shape and torch.equal(_bits(out[0]), _bits(ref[0]))


def test_kernel_forward_inf_and_nan():
    beta = torch.tensor(1.3)
    x = torch.tensor([float('inf'), -float('inf'), float('nan'), 0.2])
    gates = torch.tensor(gate_values_for_bits(16, 0.3))
    for signed in (True, False):
        got = nested_quantize(x, beta, signed, gates)
        want = _NestedQuantize.apply(x, beta, gates, signed, False)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert got[:2].isfinite().all() and got[2].isnan()


def test_kernel_sums_in_double():
    """A large per-tensor β gradient: the kernel matches a float64 evaluation of the same sums."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 64, 64, generator=gen).relu()
    upstream = torch.randn(x.shape, generator=gen)
    beta, gates = torch.tensor(2.0), torch.tensor(gate_values_for_bits(8, 0.3))
    x_q, _, grad_beta, grad_gates = _run(_NestedQuantizeKernel, x, beta, gates, False, upstream)
    g64, xq64, x64 = upstream.double(), x_q.double(), x.double()
    inside = (x <= beta).double()
    want = ((g64 * xq64).sum() - (g64 * inside * x64).sum()) / 2.0
    torch.testing.assert_close(grad_beta.double(), want, rtol=1e-6, atol=0)
    # Σ grad · ε_l from the codes: levels 1, 2 on, level 3 the first switched-off one, whose
    # residual is the 16-bit code less 257 times the 8-bit one (ONNX's codes of x / s_b)
    _, codes = torch.ops.mmsparse.nested_quantize_forward(x, beta, False, 2, True)
    s32 = scales(beta)
    c8, c16 = ((x.clamp(0, 2) / s32[level]).round() for level in (2, 3))
    codes.append(c16.clamp(0, 2 ** 16 - 1) - 257 * c8.clamp(0, 255))
    s = scales(beta.double())
    per_level = torch.stack([(g64 * c.double()).sum() * s[level]
                             for level, c in enumerate(codes, start=1)])
    want = torch.stack([per_level[0] + per_level[1], per_level[1], per_level[2],
                        torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(grad_gates.double(), want, rtol=1e-6, atol=0)


def test_kernel_independent_of_thread_count():
    cases = [(_case((4, 50000), False, False, seed=11), False),  # several chunks, one channel
             (_case((64, 9000), True, True, seed=12), True)]     # several chunks per channel
    threads = torch.get_num_threads()
    try:
        for (x, beta), signed in cases:
            upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
            gates = torch.tensor(gate_values_for_bits(8, 0.3))
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(_run(_NestedQuantizeKernel, x, beta, gates, signed, upstream))
            for other in results[1:]:
                for a, b in zip(results[0], other):
                    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
            # the double sums themselves, before rounding to float32
            x_q, codes = torch.ops.mmsparse.nested_quantize_forward(x, beta, signed, 2, True)
            sums = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                sums.append(torch.ops.mmsparse.nested_quantize_backward(
                    upstream, x, beta, x_q, codes, signed, 2, True, True)[1])
            assert all(torch.equal(sums[0].view(torch.int64), s.view(torch.int64)) for s in sums)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize('shape,beta_shape', [((4, 6, 5, 5), (1, 6, 1, 1)), ((8, 6), (6,)),
                                              ((6, 6), (6,)), ((4, 5), (4, 5))])
def test_unsupported_beta_layout_falls_back(shape, beta_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    beta = torch.rand(beta_shape, generator=gen) + 0.5
    gates = torch.tensor(gate_values_for_bits(4, 0.3))
    assert not _kernel_applies(x, beta)
    xg, bg, gg = (t.clone().requires_grad_() for t in (x, beta, gates))
    out = nested_quantize(xg, bg, True, gg)
    assert type(out.grad_fn).__name__ == '_NestedQuantizeBackward'
    out.sum().backward()
    ref = _run(_NestedQuantize, x, beta, gates, True, torch.ones(out.shape))
    assert torch.equal(out.detach(), ref[0])
    assert torch.equal(bg.grad, ref[2]) and torch.equal(gg.grad, ref[3])
    with pytest.raises(RuntimeError, match='beta must have one element'):
        torch.ops.mmsparse.nested_quantize_forward(x, beta, True, 1, False)


def test_nested_quantize_dispatch():
    """float32 CPU tensors with a supported β take the kernel; float64 keeps the tensor path."""
    gates = torch.tensor(gate_values_for_bits(8, 0.3), requires_grad=True)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    out = nested_quantize(w, torch.rand(8, 1, 1, 1) + 0.5, True, gates)
    assert type(out.grad_fn).__name__ == '_NestedQuantizeKernelBackward'
    out = nested_quantize(w.double(), torch.tensor(1.0, dtype=torch.float64), True, gates)
    assert type(out.grad_fn).__name__ == '_NestedQuantizeBackward'


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8, 16])
def test_kernel_exact_ties_round_half_to_even(signed, bits):
    """Exact float32 ties ``(m + ½) · s_b`` in every channel (per-channel steps, powers of two):
    the kernel's codes are ``clip(np.rint(x / s_b))`` (ONNX QuantizeLinear), bit-identical to the
    tensor path, the kept residual codes stay within ``±2^(b/2−1)``, and ``±β`` gives the outermost
    code. Below 16 bits the span is exact for the first switched-off width ``2b`` as well, where
    ``x / s_2b`` is a tie too: its gate gradient ``Σ grad · ε_2b`` must use the same rule."""
    off = 2 * bits if bits < 16 else bits  # the width whose grid step is a power of two
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    first = lo - 1 if signed else lo
    units = np.concatenate([np.arange(first, hi + 1) + 0.5, [lo, hi, lo - 2.0, hi + 2.0]])
    spans = np.array([(2.0 ** off - 1) * 2.0 ** -(6 + c) for c in range(3)])
    step = spans / (2 ** bits - 1)  # exact: (2^2b − 1) / (2^b − 1) = 2^b + 1
    x = torch.from_numpy((units[None, :] * step[:, None]).astype(np.float32))
    beta = torch.from_numpy((spans / 2 if signed else spans).astype(np.float32)).view(-1, 1)
    assert torch.equal(scales(2 * beta if signed else beta)[BIT_WIDTHS.index(bits)].flatten(),
                       torch.from_numpy(step.astype(np.float32)))
    gates = torch.tensor(gate_values_for_bits(bits, 0.3))
    upstream = torch.rand(x.shape, generator=torch.Generator().manual_seed(bits)) + 0.5
    kernel = _run(_NestedQuantizeKernel, x, beta, gates, signed, upstream)
    _assert_same(kernel, _run(_NestedQuantize, x, beta, gates, signed, upstream), upstream, x,
                 beta)
    want = np.clip(np.rint(units), lo, hi)
    codes = kernel[0].double().numpy() / step[:, None]
    np.testing.assert_array_equal(codes, np.broadcast_to(want, codes.shape))
    assert (codes[:, 0] == (lo if signed else 0)).all() and (codes[:, -1] == hi).all()
    levels = BIT_WIDTHS.index(bits)
    _, kept = torch.ops.mmsparse.nested_quantize_forward(x, beta, signed, levels, True)
    for level, c in enumerate(kept, start=1):
        half = 2 ** (BIT_WIDTHS[level] // 2 - 1)
        assert c.abs().max() <= half
    if bits < 16:
        off_hi = 2 ** (off - 1) - 1 if signed else 2 ** off - 1
        off_lo = -off_hi if signed else 0
        off_step = step / (2 ** bits + 1)
        off_codes = np.clip(np.rint(x.double().numpy() / off_step[:, None]), off_lo, off_hi)
        eps = (off_codes - (2 ** bits + 1) * codes) * off_step[:, None]  # ε_2b = x_2b − x_b
        assert (np.abs(eps) > 0).sum() > units.size  # the residuals of the ties are not zero
        want_grad = (upstream.double().numpy() * eps).sum()
        np.testing.assert_allclose(float(kernel[3][levels]), want_grad, rtol=1e-6)
