"""The tensor-op paths (what a CUDA user runs) read nothing back to the host per layer and step.

A GPU synchronises whenever a value is read on the host (``bool``, ``int``, ``float``, ``item``,
``tolist``, boolean indexing). These tests run the tensor-op paths on the CPU (float64 weights, which
the compiled float32 kernels do not take) and count such reads: the count must not grow with the
number of layers.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.cgmq import CGMQConv2d, nested_quantize
from mmsparse.cgmq.layers import cache_host_states, read_host_states
from mmsparse.maxq import MaxQConv2d, MaxQHook, SRSTEConv2d
from mmsparse.sapp import MagnitudeBlockConv2d, SAPPConv2d

READS = ('__bool__', '__int__', '__float__', '__index__', 'item', 'tolist', 'nonzero')


@contextlib.contextmanager
def host_reads(monkeypatch):
    """Count the Tensor methods that read values to the host while the block runs."""
    calls = []
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)
            patch.setattr(torch.Tensor, name, counted)
        yield calls


def _net(layer_type, count, **kwargs):
    return nn.Sequential(*[layer_type(32, 32, 3, padding=1, **kwargs) for _ in range(count)]).double()


@pytest.mark.parametrize('layer_type', [MaxQConv2d, SRSTEConv2d])
@pytest.mark.parametrize('preserve', [0.0, 0.5])
def test_nm_masks_of_a_step_read_once_whatever_the_layer_count(monkeypatch, layer_type, preserve):
    reads = []
    for count in (1, 4):
        net = _net(layer_type, count, n=1, m=16)
        runner = SimpleNamespace(model=net, iter=3)
        hook = MaxQHook()
        with host_reads(monkeypatch) as calls:
            hook._refresh(runner, preserve)                  # the finiteness check: one read
            loss = net(torch.randn(1, 32, 8, 8, dtype=torch.float64)).square().mean()
            loss.backward()
            for layer in net:
                layer.edit_grad(2e-4)
        reads.append(len(calls))
        assert all(bool((layer.mask != 1).any()) for layer in net)   # the masks were computed
    assert reads[0] == reads[1] == 1


def test_nm_mask_refresh_still_refuses_nan_weights_on_the_tensor_path():
    net = _net(MaxQConv2d, 3, n=1, m=16)
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match=r'^MaxQHook: 1\.weight holds 1 NaN/inf values'):
        MaxQHook()._refresh(SimpleNamespace(model=net, iter=5), 0.0)
    assert all(bool((layer.mask == 1).all()) for layer in net)   # no mask was written


@pytest.mark.parametrize('layer_type', [SAPPConv2d, MagnitudeBlockConv2d])
def test_block_layers_in_a_sparse_step_read_nothing(monkeypatch, layer_type):
    net = _net(layer_type, 3, block_size=8, min_blocks=1)
    for layer in net:
        layer.prune_to(layer.n_blocks // 2)
        assert layer.n_pruned == layer.n_blocks // 2
    with host_reads(monkeypatch) as calls:
        loss = net(torch.randn(1, 32, 8, 8, dtype=torch.float64)).square().mean()
        loss.backward()
        for layer in net:          # what SequentialAttentionHook.apply does in a SPARSE phase
            layer.logits_frozen = True
            layer.apply_support()
            layer.prune_to(layer.n_blocks // 2)
    assert calls == []


def test_cgmq_step_reads_the_gates_once_for_all_layers(monkeypatch):
    reads = []
    for count in (1, 4):
        net = nn.Sequential(*[CGMQConv2d(8, 8, 3, padding=1, bits_w=4, bits_a=8, act_signed=True)
                              for _ in range(count)])
        x = torch.randn(2, 8, 6, 6)
        with host_reads(monkeypatch) as calls:
            cache_host_states(net, True)
            read_host_states(net)                             # CGMQHook.before_train_iter
            net(x).square().mean().backward()                 # the layers' own forward (kernel)
            # float64 copies of the inputs and weights run the tensor-op quantizer
            y = x.double()
            for layer in net:
                w_q = nested_quantize(layer.weight.double(), layer._weight_beta().double(), True,
                                      layer.weight_gate, layer.bits_w)
                x_q = nested_quantize(y, layer._act_beta().double(), layer.signed_input,
                                      layer.act_gate, layer.bits_a)
                y = F.conv2d(x_q, w_q, padding=1)
            y.square().mean().backward()
            bits = [(layer.bits_w, layer.bits_a) for layer in net]
            cache_host_states(net, False)
        reads.append(len(calls))
        assert bits == [(4, 8)] * count
        assert all(layer.weight_gate.grad is not None and layer.act_range.grad is not None
                   for layer in net)
    assert reads[0] == reads[1] == 1


def test_cgmq_host_copies_follow_in_place_gate_changes():
    layer = CGMQConv2d(8, 8, 3, bits_w=8, bits_a=8)
    cache_host_states([layer], True)
    assert layer.bits_w == 8
    with torch.no_grad():
        layer.weight_gate[1] = -1.0          # 8 -> 4 bits, as the greedy reduction does
    assert layer.bits_w == 4
    cache_host_states([layer], False)
    layer.weight_gate.data[0] = -1.0          # outside a step every use reads the tensor
    assert layer.bits_w == 2
