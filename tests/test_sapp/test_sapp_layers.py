"""SA++ and magnitude block layers: scale, selection, dense-by-rule, build paths, folding."""
import math

import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.core import CompressedLayer, Dense, FoldSpec, model_report, verify_state_dict
from mmsparse.engine import convert_layers
from mmsparse.sapp import MagnitudeBlockConv2d, MagnitudeBlockLinear, SAPPConv2d, SAPPLinear


def _reference_weight(w, logits, support, b):
    """W ⊙ n·softmax(L) ⊙ support, element by element from the SPEC §3 formulas."""
    o, i, kh, kw = w.shape
    n = logits.numel()
    e = [[float(torch.exp(logits[r, c])) for c in range(logits.shape[1])] for r in range(logits.shape[0])]
    total = sum(sum(row) for row in e)
    out = torch.empty_like(w)
    for oc in range(o):
        for ic in range(i):
            for ky in range(kh):
                for kx in range(kw):
                    col = (ky * kw + kx) * i + ic
                    r, c = oc // b, col // b
                    out[oc, ic, ky, kx] = w[oc, ic, ky, kx] * n * e[r][c] / total * support[r, c]
    return out


def test_scale_and_support_match_reference():
    torch.manual_seed(0)
    conv = SAPPConv2d(8, 8, 3, padding=1, block_size=4, min_blocks=1)
    assert conv.block_logits.shape == (2, 18) and torch.count_nonzero(conv.block_logits) == 0
    x = torch.randn(2, 8, 5, 5)
    # logits at 0: scale 1 everywhere, the layer is the dense conv
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    with torch.no_grad():
        conv.block_logits.normal_()
        conv.support[1, 3] = 0
        conv.support[0, 17] = 0
    ref = _reference_weight(conv.weight.detach(), conv.block_logits.detach(), conv.support, 4)
    torch.testing.assert_close(conv.layer_weight(), ref)
    assert conv.block_scale().mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(conv(x), F.conv2d(x, ref, conv.bias, padding=1))


def test_logits_get_gradients_unless_frozen():
    lin = SAPPLinear(16, 8, block_size=4, min_blocks=1)
    lin(torch.randn(3, 16)).pow(2).sum().backward()
    assert lin.block_logits.grad is not None and lin.block_logits.grad.abs().sum() > 0
    lin.zero_grad(set_to_none=True)
    lin.logits_frozen = True
    lin(torch.randn(3, 16)).pow(2).sum().backward()
    assert lin.block_logits.grad is None and lin.weight.grad is not None


def test_selection_by_attention_not_magnitude():
    lin = SAPPLinear(8, 8, block_size=4, min_blocks=1)  # 2 x 2 blocks
    mag = MagnitudeBlockLinear(8, 8, block_size=4, min_blocks=1)
    with torch.no_grad():
        w = torch.full((8, 8), 0.01)
        w[:4, :4] = 10.0          # block 0: largest magnitude
        lin.weight.copy_(w)
        mag.weight.copy_(w)
        lin.block_logits.copy_(torch.tensor([[-1.0, 2.0], [0.5, 0.0]]))
    assert lin.prune_to(1) == 1
    # block 0 has by far the largest magnitude but the lowest attention: it goes first
    assert lin.support.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert lin.weight[:4, :4].abs().sum() == 0  # hard-pruned weights
    lin.prune_to(2)
    assert lin.support.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    lin.prune_to(1)  # never revives: the support only shrinks until release()
    assert lin.n_pruned == 2
    mag.prune_to(1)  # magnitude baseline: ties among the small blocks go to the lower index
    assert mag.support.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    revived = lin.release()
    assert lin.n_pruned == 0 and int(revived.sum()) == 32


def test_dense_by_rule_and_build_paths():
    conv = build_conv_layer(dict(type='SAPPConv2d', block_size=16), 64, 64, 3, padding=1)
    assert isinstance(conv, SAPPConv2d) and conv.is_sparse and conv.n_blocks == 144
    stem = build_conv_layer(dict(type='SAPPConv2d', block_size=16), 3, 64, 7)
    assert not stem.is_sparse and 'not divisible by B=16' in stem.dense_reason
    assert stem.block_logits is None and stem.support is None
    small = SAPPConv2d(64, 128, 1, block_size=16)
    assert '32 blocks < min_blocks=100' in small.dense_reason
    assert 'groups=4' in SAPPConv2d(64, 64, 3, groups=4, block_size=16).dense_reason
    assert small.fold_spec() == FoldSpec('sapp', Dense(small.dense_reason))
    with pytest.raises(ValueError, match='cannot take 16x16 blocks'):
        SAPPConv2d(24, 24, 3, block_size=16, incompatible='error')
    with pytest.raises(ValueError, match='block_size must be a positive integer'):
        SAPPConv2d(16, 16, 3, block_size=0)
    # state dict: the plain conv's keys plus support and logits
    assert set(conv.state_dict()) == {'weight', 'bias', 'support', 'block_logits'}
    assert set(MagnitudeBlockConv2d(64, 64, 3).state_dict()) == {'weight', 'bias', 'support'}


def test_converter_swaps_layers_and_keeps_parameters():
    model = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 256))
    w0 = model[0].weight
    converted = convert_layers(model, [
        dict(include=r'0', layer=dict(type='SAPPConv2d', block_size=16)),
        dict(include=r'3', layer=dict(type='SAPPLinear', block_size=16, min_blocks=100))])
    assert converted == {'0': 'SAPPConv2d', '3': 'SAPPLinear'}
    assert model[0].weight is w0 and model[3].n_blocks == 256


def test_folded_model_equals_sparse_model_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(SAPPConv2d(16, 32, 3, padding=1, block_size=8, min_blocks=4), nn.ReLU(),
                          SAPPConv2d(32, 32, 1, block_size=8, min_blocks=100), nn.Flatten(),
                          SAPPLinear(32 * 16, 16, block_size=8, min_blocks=4))
    with torch.no_grad():
        for layer in (model[0], model[4]):
            layer.block_logits.normal_()
            layer.prune_to(int(0.7 * layer.n_blocks))
    model.eval()
    x = torch.randn(2, 16, 4, 4)
    expected = model(x)
    patterns = {n: m.fold_spec() for n, m in model.named_modules() if isinstance(m, CompressedLayer)}
    assert patterns['2'].dense and patterns['0'].pattern.size == 8
    # the shared fold tool's protocol: each compressed layer becomes a plain layer with folded_weight()
    folded = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1),
                           nn.Flatten(), nn.Linear(32 * 16, 16)).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            state[f'{name}.weight'] = module.folded_weight()
            state[f'{name}.bias'] = module.bias.detach()
    folded.load_state_dict(state)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=0)
    assert verify_state_dict(state, patterns) == []
    zero_share = [s.sparsity for s in model_report(model) if s.name == '0'][0]
    assert zero_share == pytest.approx(model[0].block_sparsity)
    # exact zero blocks: a pruned block of the folded weight is all 0.0
    assert model[0].fold_spec().pattern.min_sparsity == math.floor(int(0.7 * 72) / 72 * 1e6) / 1e6


def test_shared_fold_tool_folds_and_verifies_block_layers():
    from mmsparse import export
    torch.manual_seed(0)
    model = nn.Sequential(SAPPConv2d(16, 32, 3, padding=1, block_size=8, min_blocks=4), nn.ReLU(),
                          MagnitudeBlockConv2d(32, 32, 3, padding=1, block_size=8, min_blocks=4))
    with torch.no_grad():
        model[0].block_logits.normal_()
        for layer in (model[0], model[2]):
            layer.prune_to(int(0.7 * layer.n_blocks))
    state, info = export.fold_state_dict(model)
    assert set(state) == {'0.weight', '0.bias', '2.weight', '2.bias'}  # no logits, no support
    assert info['0'].to_meta()['pattern'] == 'block8@0.694444' and info['2'].method == 'magnitude'
    export.verify_folded(state, info)
    # one non-zero element in one pruned block is caught
    r, c = [int(v) for v in torch.nonzero(model[0].support == 0)[0]]
    state['0.weight'][r * 8, (c * 8) % 16, (c * 8) // 48, (c * 8) // 16 % 3] = 1e-6
    with pytest.raises(export.PatternViolationError, match='49/72 blocks are exactly zero, 50 required'):
        export.verify_folded(state, info)
    plain = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
    plain.load_state_dict(export.fold_state_dict(model)[0])
    x = torch.randn(1, 16, 6, 6)
    torch.testing.assert_close(plain.eval()(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize('shape', [(32, 64, 3, 3), (32, 8, 4, 4), (32, 64)])
def test_block_multiply_in_place_equals_the_product(shape):
    from mmsparse.core.blocks import block_grid, block_multiply, block_multiply_
    w = torch.randn(shape)
    values = (torch.rand(block_grid(w.shape, 16)) > 0.5).float()
    expected = block_multiply(w, values, 16)
    assert block_multiply_(w, values, 16) is w and torch.equal(w, expected)


def test_pruned_count_follows_every_support_change():
    conv = MagnitudeBlockConv2d(32, 64, 3, padding=1, block_size=16, min_blocks=1)
    assert conv.n_pruned == 0
    conv.prune_to(5)
    assert conv.n_pruned == 5
    conv.support.view(-1)[-1] = 0          # an in-place edit through a view
    assert conv.n_pruned == 6
    conv.load_state_dict({**conv.state_dict(), 'support': torch.ones_like(conv.support)})
    assert conv.n_pruned == 0
    conv.release()
    conv.support.zero_()
    assert conv.n_pruned == conv.n_blocks
