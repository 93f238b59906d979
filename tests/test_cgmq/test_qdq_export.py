"""QDQ ONNX export of CGMQ layers: node types, metadata, ONNX Runtime parity."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.cgmq import CGMQConv2d, CGMQLinear
from mmsparse.export.qdq import META_KEY, export_qdq


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(
        CGMQConv2d(3, 8, 3, padding=1, bits_w=4, bits_a=8), nn.ReLU(),
        CGMQConv2d(8, 8, 3, padding=1, bits_w=2, bits_a=4), nn.ReLU(),
        CGMQConv2d(8, 8, 1, bits_w=16, bits_a=16), nn.ReLU(),
        CGMQConv2d(8, 8, 3, padding=1, bits_w=8, bits_a=8, act_signed=True), nn.Flatten(),
        CGMQLinear(8 * 8 * 8, 5, bits_w=8, bits_a=2))
    for idx, rng in ((0, 2.0), (2, 1.0), (4, 1.0), (6, 1.0), (8, 0.5)):
        layer = net[idx]
        layer.set_ranges(torch.tensor(rng), torch.tensor(-1.0 if idx in (0, 8) else 0.0))
    return net.eval()


@pytest.mark.parametrize('level', ['all', 'disabled'])
def test_qdq_onnx_matches_fake_quant_model(tmp_path, level):
    net = _net()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x).numpy()
    path = str(tmp_path / 'qdq.onnx')
    report = export_qdq(net, x, path, input_names=['x'])
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count('DequantizeLinear') >= 8 and 'QuantizeLinear' in ops
    assert model.opset_import[0].version >= 13
    meta = {p.key: p.value for p in model.metadata_props}
    bits = {r['layer']: (r['bits_w'], r['bits_a']) for r in json.loads(meta[META_KEY])}
    assert bits == {'0': (4, 8), '2': (2, 4), '4': (16, 16), '6': (8, 8), '8': (8, 2)}
    assert report[1]['act_onnx'] == 'uint8 per-tensor QDQ' and report[2]['weight_onnx'].startswith('float')
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level == 'all'
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    out = ort.InferenceSession(path, opts).run(None, {'x': x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_weight_initializers_hold_clipped_int8_codes(tmp_path):
    net = _net()
    path = str(tmp_path / 'qdq.onnx')
    export_qdq(net, torch.randn(1, 3, 8, 8), path, opset=13, input_names=['x'])
    with pytest.raises(ValueError, match='opset >= 13'):
        export_qdq(net, torch.randn(1, 3, 8, 8), path, opset=11)
    # the quantized weights of a 2-bit layer are codes {-1, 0, 1} times the per-channel scale
    layer = net[2]
    w = layer.folded_weight()
    scale = 2 * layer.weight_range.detach().abs() / 3
    codes = w / scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-5)
    assert set(codes.round().unique().tolist()) <= {-1.0, 0.0, 1.0}
