import numpy as np
import pytest
import torch
from mmcv.cnn import build_conv_layer
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.maxq import MaxQConv2d, MaxQLinear, OneShotNMConv2d, SRSTEConv2d
from mmsparse.maxq.mask import maxq_mask


def test_build_through_conv_cfg_and_stem_stays_dense():
    conv = build_conv_layer(dict(type='MaxQConv2d', n=1, m=16), 32, 16, 3, padding=1)
    assert isinstance(conv, MaxQConv2d) and isinstance(conv, nn.Conv2d) and conv.is_sparse
    stem = build_conv_layer(dict(type='MaxQConv2d', n=1, m=16), 3, 16, 7)
    assert not stem.is_sparse and 'dense by rule' in stem.dense_reason
    # SPEC §1: the stem stays dense even where the pattern would fit its 3 channels
    assert not build_conv_layer(dict(type='MaxQConv2d', n=2, m=3), 3, 16, 7).is_sparse
    with pytest.raises(ValueError, match='cannot take the 1:16 pattern'):
        build_conv_layer(dict(type='MaxQConv2d', n=1, m=16, incompatible='error'), 3, 16, 7)
    with pytest.raises(ValueError, match='1 <= N < M'):
        build_conv_layer(dict(type='MaxQConv2d', n=4, m=4), 16, 16, 3)


def test_state_dict_keys_match_plain_conv_plus_mask():
    conv = MaxQConv2d(16, 8, 3, n=2, m=4)
    assert set(conv.state_dict()) == set(nn.Conv2d(16, 8, 3).state_dict()) | {'mask'}
    dense = nn.Conv2d(16, 8, 3).state_dict()
    result = conv.load_state_dict(dense, strict=False)
    assert result.missing_keys == ['mask'] and result.unexpected_keys == []


@pytest.mark.parametrize('cls', [MaxQConv2d, SRSTEConv2d])
def test_forward_uses_masked_weight_and_ste_gradient(cls):
    torch.manual_seed(0)
    conv = cls(16, 8, 3, padding=1, n=2, m=4)
    conv.refresh_mask(0.0)
    x = torch.randn(2, 16, 5, 5)
    out = conv(x)
    ref = nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias, padding=1)
    torch.testing.assert_close(out, ref)
    # straight-through: grad wrt W equals grad wrt the effective weight W*S (pruned entries included)
    w_eff = (conv.weight * conv.mask).detach().requires_grad_()
    nn.functional.conv2d(x, w_eff, conv.bias, padding=1).sum().backward()
    out.sum().backward()
    torch.testing.assert_close(conv.weight.grad, w_eff.grad)
    assert (conv.weight.grad[conv.mask == 0] != 0).any()


def _linear_mask_reference(weight: np.ndarray, n: int, m: int, tau: float = 0.01) -> np.ndarray:
    """SPEC §1 steps 1, 3, 4 at p = 0 for a linear weight, in float64: ``S = H ⊙ (1 + q_filter)``
    (no kernel axis: a linear layer has no spatial positions)."""
    a = np.abs(weight.astype(np.float64))
    hard = np.zeros_like(a)
    for row in range(a.shape[0]):
        for start in range(0, a.shape[1], m):
            keep = np.argsort(-a[row, start:start + m], kind='stable')[:n]
            hard[row, start + keep] = 1.0
    k = (m - n) * a.shape[1] // m
    soft = np.ones_like(a)
    for row in range(a.shape[0]):
        asc = np.sort(a[row])
        threshold = 0.5 * (asc[k - 1] + asc[k])
        top = a[row] >= asc[k]
        soft[row] += top / (1.0 + np.exp(-(a[row] - threshold) / tau))
    return hard * soft


def test_linear_mask_filter_axis_only():
    torch.manual_seed(0)
    lin = MaxQLinear(32, 4, n=1, m=16)
    lin.refresh_mask(0.0)
    expected = _linear_mask_reference(lin.weight.detach().numpy(), 1, 16)
    torch.testing.assert_close(lin.mask.double(), torch.from_numpy(expected), rtol=0, atol=1e-5)
    # per row of 32 weights, k = 30: only the 2 largest get a filter-axis boost (values in (1, 2))
    assert ((lin.mask > 1).sum(1) <= 2).all() and float(lin.mask.max()) < 2.0
    assert int((lin.folded_weight().reshape(-1, 16) != 0).sum(1).max()) == 1


def _step(wrapper_type, conv, **kwargs):
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    wrapper = OPTIM_WRAPPERS.build(dict(type=wrapper_type, optimizer=opt, **kwargs))
    wrapper.bind_model(conv)
    loss = conv(torch.ones(1, 16, 3, 3)).sum()
    wrapper.update_params(loss)
    return conv.weight.detach().clone()


def _fresh(cls=MaxQConv2d):
    torch.manual_seed(1)
    conv = cls(16, 4, 3, n=2, m=4)
    conv.refresh_mask(0.0)
    return conv


def test_decay_fp32_matches_formula_and_amp_with_real_scaler():
    conv = _fresh()
    w0 = conv.weight.detach().clone()
    x = torch.ones(1, 16, 3, 3)
    conv(x).sum().backward()
    expected = w0 - 0.1 * (conv.weight.grad + 1e-2 * (1 - conv.mask.clamp(0, 1)) * w0)
    conv.weight.grad = None
    got = _step('NMSparseOptimWrapper', conv, decay=1e-2)
    torch.testing.assert_close(got, expected)
    # AMP wrapper (CPU GradScaler, loss scaled by 1024): the decay sees unscaled gradients
    conv = _fresh()
    got_amp = _step('NMSparseAmpOptimWrapper', conv, decay=1e-2, loss_scale=1024.0)
    torch.testing.assert_close(got_amp, expected, rtol=1e-5, atol=1e-6)


def test_unbound_wrapper_is_an_error():
    conv = _fresh()
    wrapper = OPTIM_WRAPPERS.build(dict(type='NMSparseOptimWrapper',
                                        optimizer=torch.optim.SGD(conv.parameters(), lr=0.1)))
    with pytest.raises(RuntimeError, match='not bound'):
        wrapper.update_params(conv(torch.ones(1, 16, 3, 3)).sum())


def test_oneshot_masks_grads_and_weights():
    conv = _fresh(OneShotNMConv2d)
    w = _step('NMSparseOptimWrapper', conv, decay=0.0)
    assert (w[conv.mask == 0] == 0).all()
    assert torch.equal(conv.folded_weight(), w * conv.mask)


def test_plain_optim_wrapper_still_works():
    conv = _fresh()
    x = torch.randn(1, 16, 3, 3)
    w0 = conv.weight.detach().clone()
    # reference (SPEC §1.5): forward with W ⊙ S, the gradient passes straight through to W
    masked = (w0 * conv.mask).requires_grad_()
    torch.nn.functional.conv2d(x, masked, conv.bias.detach()).sum().backward()
    OptimWrapper(torch.optim.SGD(conv.parameters(), lr=0.1)).update_params(conv(x).sum())
    torch.testing.assert_close(conv.weight.detach(), w0 - 0.1 * masked.grad)


def test_refresh_skips_unchanged_weights_and_follows_optimizer_steps():
    conv = _fresh()
    conv.mask.fill_(7.0)             # would be overwritten by a recomputation
    conv.refresh_mask(0.0)           # same weights, same preserve rate: cached
    assert (conv.mask == 7.0).all()
    conv.refresh_mask(0.5)           # new preserve rate: recomputed
    assert not (conv.mask == 7.0).any()
    conv.mask.fill_(7.0)
    conv(torch.ones(1, 16, 3, 3)).sum().backward()
    torch.optim.SGD(conv.parameters(), lr=0.1).step()   # in-place update bumps the version
    conv.refresh_mask(0.5)
    assert not (conv.mask == 7.0).any()


@pytest.mark.parametrize('contiguous', [True, False])
def test_decay_edit_equals_the_spec_formula(contiguous):
    """grad += λ·(1 − clamp(S, 0, 1))·W, element by element (compiled pass and tensor ops)."""
    from mmsparse.core.masks import decay_pruned_
    torch.manual_seed(0)
    w = torch.randn(16, 64, 3, 3)
    mask = maxq_mask(w, 1, 16, 0.4)
    grad = torch.randn_like(w)
    if not contiguous:
        w, mask, grad = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (w, mask, grad))
    # pruned (S = 0): grad + λ·W in float32; kept (S >= 1): unchanged
    expected = torch.where(mask == 0, grad + 2e-4 * w, grad)
    decay_pruned_(grad, w, mask, 2e-4)
    assert torch.equal(grad, expected)
