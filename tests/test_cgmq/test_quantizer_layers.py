"""CGMQ quantizer, gates, layers, BOPs counting and the constraint-guided gradient term."""
import math

import numpy as np
import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.cgmq import (CGMQConv2d, CGMQLinear, bits_from_gates, gate_values_for_bits,
                           greedy_reduction, nested_quantize, resolve_budget, total_bops,
                           trace_macs)
from mmsparse.core import model_report


def reference(x: float, beta: float, signed: bool, bits: int) -> float:
    """Independent float64 reference of SPEC §2's quantizer, gates on up to ``bits``: the b-bit
    code as ONNX QuantizeLinear rounds ``x_c / s_b`` (Python's ``round``: half to even), clipped
    to the b-bit range (the nested decomposition's value, see ``autograd_reference``)."""
    alpha = -beta if signed else 0.0
    s = (beta - alpha) / 3.0
    for b in (2, 4, 8, 16):
        if b >= bits:
            break
        s = s / (2 ** b + 1)
    xc = min(max(x, alpha), beta)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    return s * min(max(round(xc / s), lo), hi)


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8, 16])
def test_quantizer_matches_reference_at_edges_and_outside(signed, bits):
    beta = 1.7
    vals = [0.0, beta, -beta, 1.5 * beta, -3 * beta, beta * 0.999999, 0.3, -0.71, 1e-4]
    vals += list(np.linspace(-2 * beta, 2 * beta, 101))
    x = torch.tensor(vals, dtype=torch.float64)
    gates = torch.tensor(gate_values_for_bits(bits, 0.5), dtype=torch.float64)
    out = nested_quantize(x, torch.tensor(beta, dtype=torch.float64), signed, gates)
    ref = torch.tensor([reference(v, beta, signed, bits) for v in vals], dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # codes are integers in the b-bit range, and the grid has the expected number of levels
    span = 2 * beta if signed else beta
    codes = out / (span / (2 ** bits - 1))
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-6)
    if signed:
        assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-6
    else:
        assert codes.min() >= -1e-6 and codes.max() <= 2 ** bits - 1 + 1e-6
    assert out.abs().max() <= beta + 1e-12


def test_32_bits_is_close_to_clipped_identity():
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    gates = torch.tensor(gate_values_for_bits(32, 0.5), dtype=torch.float64)
    out = nested_quantize(x, torch.tensor(2.0, dtype=torch.float64), True, gates)
    torch.testing.assert_close(out, x.clamp(-2, 2), rtol=0, atol=1e-8)


def test_gate_ste_gradients():
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64)
    beta = torch.tensor(1.0, dtype=torch.float64)
    gates = torch.tensor([0.3, 0.2, -0.1, -0.4], dtype=torch.float64, requires_grad=True)
    assert bits_from_gates(gates) == 8
    upstream = torch.randn(200, dtype=torch.float64)
    (nested_quantize(x, beta, True, gates) * upstream).sum().backward()
    # straight-through: d x_q / d g_b = d x_q / d z_b with z = (g > 0)
    q = {b: torch.tensor(reference_vec(x, 1.0, b), dtype=torch.float64) for b in (2, 4, 8, 16)}
    eps4, eps8, eps16 = q[4] - q[2], q[8] - q[4], q[16] - q[8]
    expected = torch.stack([(upstream * (eps4 + eps8)).sum(), (upstream * eps8).sum(),
                            (upstream * eps16).sum(), torch.tensor(0.0, dtype=torch.float64)])
    torch.testing.assert_close(gates.grad, expected, rtol=1e-9, atol=1e-12)


def reference_vec(x, beta, bits):
    return [reference(float(v), beta, True, bits) for v in x]


def autograd_reference(x, beta, signed, gates):
    """SPEC §2's quantizer written with autograd straight-through tricks (the unfused definition)."""
    def code_ste(v, lo, hi, code=None, multiplier=0):
        """Rounding (ties: the accumulated ``code · multiplier + q`` even) and the noise-absorbing
        code clamp; identity backward."""
        low = torch.floor(v)
        carry = 0 if code is None else code * multiplier
        up = (v - low > 0.5) | ((v - low == 0.5) & ((carry + low) % 2 != 0))
        return v + (torch.clamp(low + up.to(v.dtype), lo, hi) - v).detach()

    span = 2 * beta if signed else beta
    s = [span / 3.0]
    for b in (2, 4, 8, 16):
        s.append(s[-1] / (2.0 ** b + 1.0))
    # tensor-bound clamp: gradient to x inside [α, β] (bounds included), to β / α outside
    x_c = x.clamp(-beta if signed else 0 * beta, beta)
    lo, hi = (-1, 1) if signed else (0, 3)
    code = code_ste(x_c / s[0], lo, hi).detach()  # the accumulated code (float64: exact)
    x2 = s[0] * code_ste(x_c / s[0], lo, hi)
    on = (gates.detach() > 0).tolist()
    z = (gates > 0).to(gates.dtype) + (gates - gates.detach())
    prev, residuals = x2, []
    for level, b in enumerate((4, 8, 16, 32)):
        half = 2 ** (b // 2 - 1)
        q = code_ste((x_c - prev) / s[level + 1], -half, half, code, 2 * half + 1)
        residuals.append(s[level + 1] * q)
        if not on[level]:
            break
        code = code * (2 * half + 1) + q.detach()
        prev = prev + residuals[-1]
    inner = None
    for level in reversed(range(len(residuals))):
        inner = z[level] * (residuals[level] if inner is None else residuals[level] + inner)
    return x2 if inner is None else x2 + inner


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8, 16, 32])
def test_fused_quantizer_gradients_match_autograd_reference(signed, bits):
    gen = torch.Generator().manual_seed(bits + 100 * signed)
    x = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen) * 1.5
    x[0, 0, :3] = torch.tensor([0.9, -0.9, 0.0], dtype=torch.float64)  # exactly at ±β and 0
    upstream = torch.randn(3, 5, 7, dtype=torch.float64, generator=gen)
    grads = []
    for fn in (nested_quantize, autograd_reference):
        xg = x.clone().requires_grad_()
        beta = torch.tensor([[0.9]] * 3, dtype=torch.float64).view(3, 1, 1).requires_grad_()
        gates = torch.tensor(gate_values_for_bits(bits, 0.3), dtype=torch.float64,
                             requires_grad=True)
        out = fn(xg, beta, signed, gates)
        (out * upstream).sum().backward()
        grads.append((out.detach(), xg.grad, beta.grad, gates.grad))
    for got, want, what in zip(grads[0], grads[1], ('x_q', 'd/dx', 'd/dbeta', 'd/dgates')):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=what)
    assert grads[0][2].abs().sum() > 0 and grads[0][1].abs().sum() > 0


def test_layers_registered_state_keys_and_train_eval_identical():
    conv = build_conv_layer(dict(type='CGMQConv2d', bits_w=4, bits_a=8), 8, 6, 3, padding=1)
    assert isinstance(conv, CGMQConv2d) and isinstance(conv, nn.Conv2d)
    extra = {'weight_range', 'act_range', 'weight_gate', 'act_gate', 'act_signed', 'calibrated'}
    assert set(conv.state_dict()) == set(nn.Conv2d(8, 6, 3).state_dict()) | extra
    info = conv.fold_spec().to_meta()
    assert {k: info[k] for k in ('method', 'pattern', 'bits_w', 'bits_a')} == dict(
        method='cgmq', pattern='w4a8', bits_w=4, bits_a=8)
    # unit ranges: signed 4-bit weight step 2/15 per output channel, input 8-bit step 2/255
    assert info['weight_scale'] == pytest.approx([2 / 15] * 6) and info['act_signed']
    assert info['act_scale'] == pytest.approx(2 / 255)
    x = torch.randn(2, 8, 5, 5)
    conv.train()
    out_train = conv(x)
    conv.eval()
    with torch.no_grad():
        out_eval = conv(x)
    torch.testing.assert_close(out_train.detach(), out_eval, rtol=0, atol=0)
    ref = nn.functional.conv2d(conv.quant_input(x), conv.folded_weight(), conv.bias, padding=1)
    torch.testing.assert_close(out_eval, ref, rtol=0, atol=0)
    lin = CGMQLinear(8, 3, bits_w=2, bits_a=2, act_signed=False)
    assert str(lin.fold_spec().pattern) == 'w2a2' and not bool(lin.act_signed)
    stats = {s.name: s for s in model_report(nn.Sequential(conv, lin))}
    assert stats['0'].pattern == 'w4a8' and stats['1'].pattern == 'w2a2'
    with pytest.raises(ValueError, match='bit width must be one of'):
        CGMQConv2d(3, 3, 1, bits_w=6)


def test_calibration_detects_sign():
    conv = CGMQConv2d(3, 4, 1)
    conv.start_observing()
    conv(torch.rand(2, 3, 4, 4) * 3)
    stat = conv.stop_observing()
    conv.set_ranges(stat['max_abs'], stat['min'])
    assert not bool(conv.act_signed) and bool(conv.calibrated)
    assert 2.0 < float(conv.act_range) <= 3.0
    torch.testing.assert_close(conv.weight_range.detach(),
                               conv.weight.detach().abs().flatten(1).amax(1))
    fixed = CGMQConv2d(3, 4, 1, act_signed=True)
    fixed.set_ranges(torch.tensor(1.0), torch.tensor(0.5))
    assert bool(fixed.act_signed)


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = CGMQConv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = CGMQConv2d(8, 16, 3, padding=1, groups=2)
        self.fc = CGMQLinear(16, 10)

    def forward(self, x):
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def test_macs_and_bops_match_hand_count():
    net = SmallNet()
    macs = trace_macs(net, (3, 16, 16))
    # conv1: 8x8x8 outputs x 3x3x3; conv2: 16x8x8 outputs x (8/2)x3x3; fc: 10 x 16
    assert macs == {'conv1': 8 * 8 * 8 * 27, 'conv2': 16 * 8 * 8 * 36, 'fc': 160}
    layers = [net.conv1, net.conv2, net.fc]
    assert total_bops(layers) == sum(macs.values()) * 64
    net.conv2.weight_gate.data[1] = -1  # 8 -> 4 bits
    assert total_bops(layers) == (macs['conv1'] + macs['fc']) * 64 + macs['conv2'] * 32
    assert resolve_budget(layers, relative=4 / 1024) == int(sum(macs.values()) * 4)
    with pytest.raises(ValueError, match='unreachable relative budget'):
        resolve_budget(layers, relative=3.9 / 1024)
    with pytest.raises(ValueError, match='unreachable budget'):
        resolve_budget(layers, gbops=1e-9)


def _wrapper_step(net, budget, R=2.0):
    params = list(net.parameters())
    wrapper = OPTIM_WRAPPERS.build(dict(type='CGMQOptimWrapper', R=R,
                                        optimizer=torch.optim.SGD(params, lr=0.0)))
    wrapper.bind_model(net)
    wrapper.set_budget(budget)
    torch.manual_seed(0)
    loss = net(torch.randn(2, 3, 16, 16)).pow(2).sum()
    loss.backward()
    task = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    wrapper.step()
    return wrapper, task


def test_constraint_term_switches_on_exactly_over_budget():
    net = SmallNet()
    trace_macs(net, (3, 16, 16))
    bops = total_bops([net.conv1, net.conv2, net.fc])
    wrapper, task = _wrapper_step(net, budget=bops)  # BOPs == budget: plain gradients
    assert not wrapper.constraint_active
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, task[n], rtol=0, atol=0)
    net.zero_grad()
    wrapper, task = _wrapper_step(net, budget=bops - 1)
    assert wrapper.constraint_active
    gate_norm = math.sqrt(sum(float(task[n].pow(2).sum()) for n in task if n.endswith('_gate')))
    shares = {'conv1': 8 * 8 * 8 * 27, 'conv2': 16 * 8 * 8 * 36, 'fc': 160}
    top = max(shares.values())
    for name in shares:
        for kind in ('weight_gate', 'act_gate'):
            key = f'{name}.{kind}'
            diff = net.get_parameter(key).grad - task[key]
            expected = torch.zeros(4)
            expected[1] = 2.0 * gate_norm * shares[name] / top  # top active gate (8 bits) only
            torch.testing.assert_close(diff, expected, rtol=1e-5, atol=1e-7)
    for n, p in net.named_parameters():  # weights and ranges: plain QAT gradients
        if not n.endswith('_gate'):
            torch.testing.assert_close(p.grad, task[n], rtol=0, atol=0)


def test_amp_wrapper_registered_and_bad_R():
    net = SmallNet()
    wrapper = OPTIM_WRAPPERS.build(dict(type='CGMQAmpOptimWrapper',
                                        optimizer=torch.optim.SGD(net.parameters(), lr=0.1)))
    assert wrapper.R == 2.0
    with pytest.raises(ValueError, match='R must be a number >= 1'):
        OPTIM_WRAPPERS.build(dict(type='CGMQOptimWrapper', R=0.5,
                                  optimizer=torch.optim.SGD(net.parameters(), lr=0.1)))


def test_greedy_reduction_is_minimal():
    net = SmallNet()
    macs = trace_macs(net, (3, 16, 16))
    layers = [('conv1', net.conv1), ('conv2', net.conv2), ('fc', net.fc)]
    bops = total_bops(lay for _, lay in layers)
    # just below the start: the cheapest single step that suffices is the fc layer (smallest MACs)
    changes = greedy_reduction(layers, bops - 1)
    assert len(changes) == 1 and changes[0]['layer'] == 'fc' and changes[0]['bits_to'] == 4
    assert total_bops(lay for _, lay in layers) <= bops - 1
    assert greedy_reduction(layers, 10 ** 12) == []
    changes = greedy_reduction(layers, sum(macs.values()) * 4)
    assert all(lay.bits_w == 2 and lay.bits_a == 2 for _, lay in layers)


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('bits', [2, 4, 8, 16, 32])
def test_exact_ties_round_half_to_even_like_onnx(signed, bits):
    """With step 2^-10 every tie ``(m + ½) · s_b`` and every quantizer operation on it is exact in
    float64: the codes are ONNX QuantizeLinear's (half to even, ``np.rint``) of ``x / s_b``
    clipped to the b-bit range; ``±β`` (a tie on a signed grid) gives the outermost code."""
    step = 2.0 ** -10
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    span = (2 ** bits - 1) * step
    beta = span / 2 if signed else span
    first = lo - 1 if signed else lo
    if bits <= 16:
        m = np.arange(first, hi + 1)
    else:  # a sample of the 2^32 ties, both ends included
        m = np.concatenate([[first, first + 1, -1, 0, hi - 1, hi],
                            np.random.default_rng(0).integers(first, hi + 1, 5000)])
    ties = (m + 0.5) * step
    x = np.concatenate([ties, [beta, -beta, beta + step, -beta - step, 0.0]])
    out = nested_quantize(torch.from_numpy(x), torch.tensor(beta, dtype=torch.float64), signed,
                          torch.tensor(gate_values_for_bits(bits, 0.5), dtype=torch.float64))
    codes = out.numpy() / step
    np.testing.assert_array_equal(codes, np.clip(np.rint(x / step), lo, hi))
    assert codes.min() >= lo and codes.max() <= hi
    if signed:
        assert codes[len(ties)] == hi and codes[len(ties) + 1] == lo
