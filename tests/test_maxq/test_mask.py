"""MaxQ mask against an independent, sort-based reference of SPEC §1 (the paper code's approach).

``maxq_mask`` runs the compiled CPU kernel on these float32 tensors; ``maxq_mask_torch`` is the
tensor-op implementation of the same definition. Both are checked against the reference and each other.
"""
import pytest
import torch

from mmsparse.core.ext import kernels_available
from mmsparse.core.masks import hard_nm_mask, hard_nm_mask_torch
from mmsparse.maxq.mask import maxq_mask, maxq_mask_torch

IMPLEMENTATIONS = pytest.mark.parametrize('impl', [maxq_mask, maxq_mask_torch],
                                          ids=['kernel', 'torch'])


def _reference(w, n, m, preserve, tau=0.01):
    a = w.abs()
    blocks = a.permute(0, 2, 3, 1).reshape(-1, m) if w.dim() == 4 else a.reshape(-1, m)
    # hard N:M: zero the M-N smallest of each block (full sort)
    order = torch.argsort(blocks, dim=1)
    hard = torch.ones_like(blocks).scatter_(1, order[:, :m - n], 0.0)
    # smallest-L1 blocks forced dense
    n_dense = int(preserve * blocks.shape[0])
    hard[torch.argsort(blocks.double().sum(1), stable=True)[:n_dense]] = 1.0
    if w.dim() == 4:
        o, i, kh, kw = w.shape
        hard = hard.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    else:
        hard = hard.reshape(w.shape)

    def q(rows):
        k = int((m - n) / m * rows.shape[1])
        srt, idx = torch.sort(rows, dim=1)
        thr = srt[:, k - 1:k + 1].mean(dim=1, keepdim=True)
        keep = torch.ones_like(rows).scatter_(1, idx[:, :k], 0.0)
        return keep * torch.sigmoid((rows - thr) / tau)

    soft = 1 + q(a.flatten(1)).reshape(w.shape)
    if w.dim() == 4 and w.shape[2] * w.shape[3] > 1:
        rows = a.reshape(w.shape[0] * w.shape[1], -1).t()
        soft = soft + q(rows).t().reshape(w.shape)
    return hard * soft


SHAPES = [(32, 64, 1, 1), (16, 32, 3, 3), (24, 64), (8, 48, 3, 3)]
# rows long enough for the kernel's bracketed selection (filter rows >= 2048, kernel rows 2^14)
LARGE_SHAPES = [(64, 256, 3, 3), (24, 512, 3, 3), (16, 4096)]


@IMPLEMENTATIONS
@pytest.mark.parametrize('shape', SHAPES + LARGE_SHAPES)
@pytest.mark.parametrize('nm', [(1, 4), (2, 4), (2, 8), (1, 16)])
@pytest.mark.parametrize('preserve', [0.0, 0.37, 1.0])
def test_matches_reference(impl, shape, nm, preserve):
    n, m = nm
    if shape[1] % m:
        pytest.skip('channels not divisible')
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) * 31 + n * 7 + m))
    ours = impl(w, n, m, preserve)
    ref = _reference(w, n, m, preserve)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize('shape', SHAPES)
def test_values_and_nm_after_folding_at_p0(shape):
    w = torch.randn(shape)
    s = maxq_mask(w, 1, 16 if shape[1] % 16 == 0 else 4, 0.0)
    # {0} ∪ [1, 3) in exact arithmetic; float32 sigmoid saturates to 1.0, so 3.0 can occur
    assert ((s == 0) | ((s >= 1) & (s <= 3))).all()
    m = 16 if shape[1] % 16 == 0 else 4
    folded = (w * s)
    blocks = folded.permute(0, 2, 3, 1).reshape(-1, m) if w.dim() == 4 else folded.reshape(-1, m)
    assert int((blocks != 0).sum(1).max()) <= 1


def test_preserve_keeps_smallest_l1_blocks_dense():
    w = torch.randn(4, 8) * 10
    w[0, 0:4] = 0.01 * torch.tensor([1.0, 2.0, 3.0, 4.0])   # clearly the smallest block
    s = maxq_mask(w, 2, 4, preserve=1 / 8)                   # 8 blocks -> 1 dense
    assert (s[0, 0:4] > 0).all()
    assert int(((s != 0).reshape(-1, 4).sum(1) == 4).sum()) == 1


def test_tie_rule_soft_scores_enhance_all_boundary_ties():
    # 2:4 on a row of 8: k = 4, the 4th and 5th smallest are tied at 0.5 -> threshold 0.5, and all
    # four 0.5s count as "among the top" (a sort would pick two of them arbitrarily).
    w = torch.tensor([[0.1, 0.2, 0.5, 0.5, 0.5, 0.5, 0.9, 1.0]])
    s = maxq_mask(w, 2, 4, 0.0)
    expected = torch.tensor([[0, 0, 1.5, 1.5, 0, 0, 2, 2]])
    torch.testing.assert_close(s, expected, rtol=0, atol=1e-6)
    # hard mask ties: lower channel index wins
    tied = torch.ones(1, 8)
    assert (maxq_mask(tied, 2, 4, 0.0) != 0).tolist() == [[True, True, False, False] * 2]


def test_same_weights_same_mask():
    w = torch.randn(16, 32, 3, 3)
    assert torch.equal(maxq_mask(w, 2, 4, 0.5), maxq_mask(w.clone(), 2, 4, 0.5))


@pytest.mark.parametrize('k', [1, 3, 4, 5, 7])
def test_order_stats_both_paths_match_sort_with_ties(k):
    from mmsparse.maxq.mask import order_stats
    rows = torch.tensor([[0.3, 0.1, 0.3, 0.3, 0.9, 0.2, 0.3, 0.5],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.7]])
    srt = rows.sort(dim=1).values
    v_k, v_k1 = order_stats(rows, k)
    assert torch.equal(v_k.flatten(), srt[:, k - 1]) and torch.equal(v_k1.flatten(), srt[:, k])


@pytest.mark.parametrize('shape', SHAPES + LARGE_SHAPES)
@pytest.mark.parametrize('preserve', [0.0, 0.37])
def test_kernel_matches_tensor_ops_with_heavy_ties(shape, preserve):
    # five distinct magnitudes: ties at every block, selection bound and dense-block boundary
    levels = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(1)).float()
    w = levels * 0.25 * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    for n, m in ((1, 16), (2, 4)):
        if shape[1] % m == 0:
            torch.testing.assert_close(maxq_mask(w, n, m, preserve),
                                       maxq_mask_torch(w, n, m, preserve), rtol=0, atol=1e-6)
            assert torch.equal(hard_nm_mask(w, n, m, preserve),
                               hard_nm_mask_torch(w.abs(), n, m, preserve))


def test_kernel_selection_exact_when_the_sample_misleads():
    # Every 16th value of a filter row (the kernel's sample positions) is large, the rest small, so
    # the sampled bracket misses the k-th smallest and the kernel must fall back to a full selection.
    w = 0.1 + 0.01 * torch.rand(4, 256, 3, 3)
    flat = w.view(4, -1)
    flat[:, ::16] = 1.0 + torch.rand(4, flat[:, ::16].shape[1])
    torch.testing.assert_close(maxq_mask(w, 1, 16, 0.0), maxq_mask_torch(w, 1, 16, 0.0),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(maxq_mask(w, 1, 16, 0.0), _reference(w, 1, 16, 0.0),
                               rtol=0, atol=1e-6)


def test_kernel_independent_of_thread_count():
    w = torch.randn(64, 256, 3, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maxq_mask(w, 1, 16, 0.37), hard_nm_mask(w, 2, 4, 0.37)
        torch.set_num_threads(2)
        two = maxq_mask(w, 1, 16, 0.37), hard_nm_mask(w, 2, 4, 0.37)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match='not divisible by M=16'):
        torch.ops.mmsparse.nm_mask(torch.randn(4, 24), 1, 16, 0, 0.01, True)
    with pytest.raises(RuntimeError, match='invalid N:M pattern 4:4'):
        torch.ops.mmsparse.nm_mask(torch.randn(4, 16), 4, 4, 0, 0.01, True)
    with pytest.raises(RuntimeError, match='float32 CPU tensor'):
        torch.ops.mmsparse.nm_mask(torch.randn(4, 16, dtype=torch.float64), 1, 4, 0, 0.01, True)


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_non_finite_weight_is_refused_by_every_path(bad):
    w = torch.randn(16, 64, 3, 3)
    w[3, 17, 1, 2] = bad
    for fn in (lambda: maxq_mask(w, 1, 16, 0.5), lambda: maxq_mask_torch(w, 1, 16, 0.5),
               lambda: hard_nm_mask(w, 2, 4), lambda: hard_nm_mask_torch(w.abs(), 2, 4)):
        with pytest.raises(ValueError, match='NaN or inf'):
            fn()


def _isa(portable=None):
    """The mask kernel's sweep ("avx2" / "portable"); ``portable`` True forces the scalar one."""
    assert kernels_available()
    return torch.ops.mmsparse.nm_mask_isa(portable)


@pytest.fixture
def portable_sweeps():
    """Run the mask kernel's scalar sweeps (the path of CPUs without AVX2) inside the test."""
    _isa(True)
    yield
    _isa(False)


@pytest.mark.parametrize('shape', SHAPES + LARGE_SHAPES + [(48, 96, 5, 5)])
@pytest.mark.parametrize('preserve', [0.0, 0.37])
def test_portable_sweeps_match_the_reference(portable_sweeps, shape, preserve):
    assert _isa() == 'portable'
    w = torch.randn(shape)
    torch.testing.assert_close(maxq_mask(w, 1, 16, preserve), _reference(w, 1, 16, preserve),
                               rtol=0, atol=1e-6)
    w.view(-1)[::5] = torch.round(w.view(-1)[::5] * 2) / 2  # ties: the tie rule of the tensor ops
    torch.testing.assert_close(maxq_mask(w, 1, 16, preserve), maxq_mask_torch(w, 1, 16, preserve),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(hard_nm_mask(w, 2, 4, preserve),
                               hard_nm_mask_torch(w.abs(), 2, 4, preserve), rtol=0, atol=0)


@pytest.mark.parametrize('shape', [(64, 256, 3, 3), (48, 96, 5, 5), (32, 64, 1, 1), (16, 4096)])
def test_avx2_and_portable_sweeps_agree_bit_for_bit(shape):
    w = torch.randn(shape)
    w.view(-1)[::3] = torch.round(w.view(-1)[::3] * 4) / 4
    results = []
    try:
        for portable in (False, True):
            _isa(portable)
            results.append((maxq_mask(w, 1, 16, 0.37), maxq_mask(w, 2, 8, 0.0),
                            hard_nm_mask(w, 1, 4, 0.9)))
    finally:
        _isa(False)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize('fn', [lambda w, out: maxq_mask(w, 1, 16, 0.37, out=out),
                                lambda w, out: hard_nm_mask(w, 2, 4, 0.37, out=out)],
                         ids=['maxq', 'hard'])
def test_mask_written_into_out(fn):
    w = torch.randn(32, 64, 3, 3)
    expected = fn(w, None)
    out = torch.full_like(w, 7.0)
    assert fn(w, out) is out and torch.equal(out, expected)
    strided = torch.full((64, 32, 3, 3), 7.0).transpose(0, 1)   # not contiguous: copied into
    assert fn(w, strided) is strided and torch.equal(strided, expected)


@pytest.mark.parametrize('preserve', [0.0, 0.5])
@pytest.mark.parametrize('shape', [(16, 64, 3, 3), (16, 64, 1, 1), (8, 64)])
def test_non_finite_weight_leaves_out_untouched(shape, preserve):
    w = torch.randn(shape)
    w.view(-1)[-1] = float('nan')   # the last element: every other one would be written first
    for soft in (True, False):
        out = torch.full_like(w, 7.0)
        with pytest.raises(ValueError, match='NaN or inf'):
            if soft:
                maxq_mask(w, 1, 16, preserve, out=out)
            else:
                hard_nm_mask(w, 1, 16, preserve, out=out)
        assert bool((out == 7.0).all())


def test_blocks_longer_than_32_channels_run_the_tensor_ops():
    w = torch.randn(8, 128, 3, 3)
    with pytest.raises(RuntimeError, match='at most 32 channels'):
        torch.ops.mmsparse.nm_mask(w, 2, 64, 0, 0.01, True)
    torch.testing.assert_close(maxq_mask(w, 2, 64, 0.5), _reference(w, 2, 64, 0.5),
                               rtol=0, atol=1e-6)
    assert torch.equal(hard_nm_mask(w, 2, 64), hard_nm_mask_torch(w.abs(), 2, 64))
