"""mmsparse.runtime.onnx: N:M Conv / Gemm nodes of an exported graph as custom nodes (onnxruntime-extensions
PyOp) running mmsparse's kernel; compared with the original graph in ONNX Runtime and with PyTorch."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mmsparse.core import NMPattern
from mmsparse.runtime import onnx as rt_onnx

from runtime_helpers import nm_weight

P4, P16 = NMPattern(1, 4), NMPattern(1, 16)


class Tiny(nn.Module):
    """Conv+BN+ReLU (3x3, 1:16, BN folded in by the exporter), stride-2 3x3 with bias (1:4), 1x1 (1:16),
    a 3x3 declared 1:4 whose weight breaks it, a linear (1:4, Gemm)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(16, 32, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 48, 3, 2, 1)
        self.conv3 = nn.Conv2d(48, 16, 1)
        self.conv4 = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 24)
        with torch.no_grad():
            self.conv1.weight.copy_(nm_weight(self.conv1.weight.shape, P16, 1))
            self.conv2.weight.copy_(nm_weight(self.conv2.weight.shape, P4, 2))
            self.conv3.weight.copy_(nm_weight(self.conv3.weight.shape, P16, 3))
            self.fc.weight.copy_(nm_weight(self.fc.weight.shape, P4, 4))
            self.bn1.running_mean.uniform_(-0.5, 0.5)
            self.bn1.running_var.uniform_(0.5, 1.5)
            self.bn1.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.conv3(self.conv2(x))
        y = self.conv4(x)
        return y, self.fc(y.mean(dim=(2, 3)))


PATTERNS = {'conv1': '1:16', 'conv2': P4, 'conv3': '1:16', 'conv4': '1:4', 'fc': '1:4'}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """``(path of the exported graph, eval-mode torch model)``: batch norm folded into conv1's weight by the
    exporter (renamed initializer), dynamic spatial size."""
    torch.manual_seed(0)
    model = Tiny().eval()
    path = str(tmp_path_factory.mktemp('onnx') / 'tiny.onnx')
    torch.onnx.export(model, torch.randn(1, 16, 23, 19), path, input_names=['input'],
                      output_names=['feat', 'logits'], opset_version=11, dynamo=False,
                      dynamic_axes={'input': {0: 'n', 2: 'h', 3: 'w'}})
    return path, model


def run(model, x, threads=2):
    return rt_onnx.inference_session(model, threads).run(None, {'input': x})


def rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def ops(model):
    return [n.op_type for n in model.graph.node]


def test_forced_sparse_matches_original_and_pytorch(exported):
    path, model = exported
    x = np.random.default_rng(0).standard_normal((1, 16, 23, 19), np.float32)
    result = rt_onnx.rewrite(path, PATTERNS, tactic='sparse', example_inputs={'input': x})
    by_layer = {r.layer: r for r in result.nodes}
    assert set(by_layer) == set(PATTERNS) and not result.missing
    # the graph's own names: BN-folded conv1 weight renamed, node found by its scope name
    assert by_layer['conv1'].node == '/conv1/Conv' and by_layer['conv1'].relu
    assert all(by_layer[k].tactic == 'sparse' for k in ('conv1', 'conv2', 'conv3', 'fc'))
    assert by_layer['conv4'].tactic is None and 'breaks its pattern' in by_layer['conv4'].reason
    assert 'conv4' in by_layer['conv4'].reason and '1:4' in by_layer['conv4'].reason
    assert ops(result.model).count(rt_onnx.CONV_OP) == 3 and ops(result.model).count(rt_onnx.LINEAR_OP) == 1
    assert ops(result.model).count('Conv') == 1 and 'Relu' not in ops(result.model)  # fused into conv1
    dense_weights = {i.name for i in onnx.load(path).graph.initializer} - {
        i.name for i in result.model.graph.initializer}
    assert len(dense_weights) >= 4  # the replaced dense weights are gone
    meta = json.loads({p.key: p.value for p in result.model.metadata_props}[rt_onnx.META_KEY])
    assert meta['nodes']['/conv1/Conv']['tactic'] == 'sparse' and meta['nodes']['/conv4/Conv']['reason']

    # other input sizes (odd, batch 2) than the one captured: the original graph in ORT and PyTorch
    for shape in ((1, 16, 23, 19), (2, 16, 17, 30)):
        x = np.random.default_rng(1).standard_normal(shape, np.float32)
        original, rewritten = run(path, x), run(result.model, x)
        with torch.no_grad():
            reference = [t.numpy() for t in model(torch.from_numpy(x))]
        for out, orig, ref in zip(rewritten, original, reference):
            assert out.shape == orig.shape
            assert rel(out, orig) <= 1e-4 and rel(out, ref) <= 1e-4


def test_dense_tactic_keeps_the_graph(exported):
    path, _ = exported
    x = np.random.default_rng(2).standard_normal((1, 16, 15, 15), np.float32)
    result = rt_onnx.rewrite(path, PATTERNS, tactic='dense')
    assert ops(result.model) == ops(onnx.load(path))
    assert [r.tactic for r in result.nodes if r.layer != 'conv4'] == ['dense'] * 4
    for out, orig in zip(run(result.model, x), run(path, x)):
        np.testing.assert_array_equal(out, orig)


def test_auto_times_both_and_reproduces(exported):
    path, _ = exported
    x = np.random.default_rng(3).standard_normal((1, 16, 40, 40), np.float32)
    result = rt_onnx.rewrite(path, PATTERNS, tactic='auto', example_inputs={'input': x}, repeats=3)
    chosen = [r for r in result.nodes if r.tactic is not None]
    assert len(chosen) == 4
    for r in chosen:
        assert r.dense_ms > 0 and r.sparse_ms > 0
        assert r.tactic == ('sparse' if r.sparse_ms < r.dense_ms else 'dense')
    assert ops(result.model).count(rt_onnx.CONV_OP) + ops(result.model).count(rt_onnx.LINEAR_OP) == sum(
        r.tactic == 'sparse' for r in chosen)
    recorded = rt_onnx.node_tactics(result.model)
    assert recorded == {r.node: r.tactic for r in chosen}
    again = rt_onnx.rewrite(path, PATTERNS, tactic=recorded)  # no timing, same choice
    assert {r.node: r.tactic for r in again.nodes if r.tactic} == recorded
    assert all(r.dense_ms is None for r in again.nodes)
    for out, orig in zip(run(again.model, x), run(path, x)):
        assert rel(out, orig) <= 1e-4


def test_errors(exported):
    path, _ = exported
    with pytest.raises(ValueError, match='patterns'):
        rt_onnx.rewrite(path)
    with pytest.raises(ValueError, match='bad tactics'):
        rt_onnx.rewrite(path, PATTERNS, tactic='fast')
    with pytest.raises(ValueError, match='no rewrite candidates: /conv4/Conv'):
        rt_onnx.rewrite(path, PATTERNS, tactic={'/conv4/Conv': 'sparse'})
    with pytest.raises(ValueError, match='no .mmsparse_runtime. metadata'):
        rt_onnx.node_tactics(path)
