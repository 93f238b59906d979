"""Exact rounding ties through the whole CGMQ chain: training, folding and the QDQ ONNX graph.

Ranges are chosen so that every grid step is a power of two: ``(m + ½) · s_b`` is then an exact
tie in float32 and every quantizer operation on it is exact, so each stage must give precisely the
codes of ONNX ``QuantizeLinear`` written independently here: ``clip(np.rint(x / s_b), lo, hi)``
(round half to even, clipped to the b-bit code range).
"""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.cgmq import CGMQLinear, nested_quantize, quantize_codes
from mmsparse.export.qdq import export_qdq, ort_session, qdq_tensors


def code_limits(bits: int, signed: bool):
    """The b-bit code range (signed: symmetric, restricted)."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def onnx_codes(values: np.ndarray, step: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Reference: ONNX QuantizeLinear's rounding (half to even) clipped to the b-bit range."""
    lo, hi = code_limits(bits, signed)
    return np.clip(np.rint(values.astype(np.float64) / step), lo, hi)


def tie_values(bits: int, signed: bool, step: float) -> np.ndarray:
    """Every tie ``(m + ½) · step`` of the b-bit grid, the range ends (``±β``, ties themselves for a
    signed grid), some codes, and values outside the range."""
    lo, hi = code_limits(bits, signed)
    ties = np.arange(lo - 1 if signed else lo, hi + (1 if signed else 0)) + 0.5
    others = np.array([lo, hi, 0, lo - 3, hi + 3, 0.25, -0.25, hi - 0.25])
    return (np.concatenate([ties, others]) * step).astype(np.float32)


def ort_quantize_linear(x: np.ndarray, scale: np.ndarray, signed: bool) -> np.ndarray:
    """ONNX Runtime's QuantizeLinear of ``x`` (per output channel, axis 0, zero point 0)."""
    zp_type, zp_dtype = (TensorProto.INT8, np.int8) if signed else (TensorProto.UINT8, np.uint8)
    graph = helper.make_graph(
        [helper.make_node('QuantizeLinear', ['x', 'scale', 'zp'], ['q'], axis=0)], 'q',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info('q', zp_type, list(x.shape))],
        [numpy_helper.from_array(scale.astype(np.float32), 'scale'),
         numpy_helper.from_array(np.zeros(scale.shape, zp_dtype), 'zp')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])
    return session.run(None, {'x': x})[0].astype(np.float64)


def tie_layer(bits_w: int, bits_a: int, act_signed: bool):
    """A CGMQLinear whose weight rows and input hold every tie of their grids (steps 2^-k)."""
    w_ties = tie_values(bits_w, True, 1.0)
    out_features = 3
    w_steps = np.array([2.0 ** -(4 + c) for c in range(out_features)], np.float32)
    weight = np.stack([w_ties * s for s in w_steps])
    layer = CGMQLinear(weight.shape[1], out_features, bits_w=bits_w, bits_a=bits_a,
                       act_signed=act_signed)
    a_step = np.float32(2.0 ** -5)
    a_ties = tie_values(bits_a, act_signed, float(a_step))
    x = np.resize(a_ties, (-(-a_ties.size // weight.shape[1]), weight.shape[1]))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        # signed span 2β = (2^b − 1) · step, unsigned β = (2^b − 1) · step: every s_l exact
        layer.weight_range.copy_(torch.from_numpy(w_steps * (2 ** bits_w - 1) / 2))
        a_span = (2 ** bits_a - 1) * a_step
        layer.act_range.fill_(float(a_span / 2 if act_signed else a_span))
        layer.calibrated.fill_(True)
    return layer, weight, w_steps, torch.from_numpy(x), a_step


@pytest.mark.parametrize('act_signed', [True, False])
@pytest.mark.parametrize('bits_w,bits_a', [(2, 8), (4, 4), (8, 2), (8, 8)])
def test_exact_ties_give_one_code_in_training_fold_and_onnx(tmp_path, bits_w, bits_a, act_signed):
    layer, weight, w_steps, x, a_step = tie_layer(bits_w, bits_a, act_signed)
    w_step = w_steps[:, None]
    want_w = onnx_codes(weight, w_step, bits_w, True)
    want_a = onnx_codes(x.numpy(), a_step, bits_a, act_signed)
    # the ties are there, and ONNX's rule differs from rounding them toward zero
    assert (np.abs(weight / w_step % 1) == 0.5).sum() >= 2 ** bits_w
    toward_zero = np.clip(np.sign(weight / w_step) * np.ceil(np.abs(weight / w_step) - 0.5),
                          *code_limits(bits_w, True))
    assert bits_w == 2 or (toward_zero != want_w).any()

    # training forward: fake-quant weight and input, gates trainable (the codes-keeping kernel path)
    layer.train()
    with torch.enable_grad():
        w_q = layer.quant_weight().detach().numpy()
        a_q = layer.quant_input(x.clone().requires_grad_()).detach().numpy()
    np.testing.assert_array_equal(w_q / w_step, want_w, err_msg='training weight codes')
    np.testing.assert_array_equal(a_q / a_step, want_a, err_msg='training input codes')
    # the float64 tensor-op path (no kernel) gives the same codes
    w64 = nested_quantize(layer.weight.double(), layer._weight_beta().double(), True,
                          layer.weight_gate.double())
    np.testing.assert_array_equal(w64.detach().numpy() / w_step, want_w, err_msg='float64 path')

    # folding: the plain checkpoint's weights and the integer codes
    np.testing.assert_array_equal(layer.folded_weight().numpy() / w_step, want_w,
                                  err_msg='folded weight codes')
    codes, scale = quantize_codes(layer.weight, layer._weight_beta(), True, bits_w)
    np.testing.assert_array_equal(scale.flatten().numpy(), w_steps)
    np.testing.assert_array_equal(codes.numpy(), want_w, err_msg='quantize_codes')

    # ONNX Runtime: QuantizeLinear of the raw weights at the export's scales, clipped to the range
    ort_w = ort_quantize_linear(weight, w_steps, True)
    np.testing.assert_array_equal(np.clip(ort_w, *code_limits(bits_w, True)), want_w,
                                  err_msg='ORT QuantizeLinear of the weights')
    # and the exported QDQ graph: its weight and input Q/DQ pairs on the same tensors
    path = str(tmp_path / 'ties.onnx')
    export_qdq(nn.Sequential(layer), x, path, input_names=['x'])
    pairs = {t.kind: t for t in qdq_tensors(path)}
    assert set(pairs) == {'weight', 'act'}
    session = ort_session(path, [pairs['weight'].output, pairs['act'].output])
    ort_wq, ort_aq = session.run([pairs['weight'].output, pairs['act'].output],
                                 {'x': x.numpy()})
    np.testing.assert_array_equal(ort_wq / w_step, want_w, err_msg='ORT weight Q/DQ')
    np.testing.assert_array_equal(ort_aq / a_step, want_a, err_msg='ORT input Q/DQ')


@pytest.mark.parametrize('bits,act_signed', [(8, True), (8, False), (4, False)])
def test_qdq_graph_reproduces_training_bit_for_bit(tmp_path, bits, act_signed):
    """Random values and ranges (no exact ties): ONNX Runtime's input Q/DQ output equals the
    training forward's fake-quantized input exactly, and its QuantizeLinear of the raw weights
    gives the fold's integer codes. With codes built level by level from float residuals, about
    2 in 10^6 values sat within float error of a tie and took the neighbouring code."""
    gen = torch.Generator().manual_seed(bits + act_signed)
    layer = CGMQLinear(256, 64, bits_w=bits, bits_a=bits, act_signed=act_signed)
    x = torch.randn(12000, 256, generator=gen) * 1.3
    x = x if act_signed else x.abs()
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
        shrink = 0.6 + 0.4 * torch.rand(64, generator=gen)  # some weights clipped
        layer.weight_range.copy_(layer.weight.abs().amax(1) * shrink)
        layer.act_range.fill_(2.0 + float(torch.rand(1, generator=gen)))
        layer.calibrated.fill_(True)
    layer.train()
    with torch.enable_grad():
        a_q = layer.quant_input(x.clone().requires_grad_()).detach().numpy()
    path = str(tmp_path / 'random.onnx')
    export_qdq(nn.Sequential(layer), x[:2], path, input_names=['x'],
               dynamic_axes={'x': {0: 'n'}})
    act = next(t for t in qdq_tensors(path) if t.kind == 'act')
    ort_aq = ort_session(path, [act.output]).run([act.output], {'x': x.numpy()})[0]
    # exact float equality (a zero may differ in sign: ORT dequantizes code 0 to +0.0)
    assert np.array_equal(ort_aq, a_q), f'{int((ort_aq != a_q).sum())} of {a_q.size} differ'
    codes, scale = quantize_codes(layer.weight, layer._weight_beta(), True, bits)
    ort_w = ort_quantize_linear(layer.weight.detach().numpy(), scale.flatten().numpy(), True)
    np.testing.assert_array_equal(np.clip(ort_w, *code_limits(bits, True)), codes.numpy())
