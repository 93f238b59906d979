"""Block tiling of the SPEC §3 2-D view, block masks, the block verifier and the BSR copy."""
import pytest
import torch

from mmsparse.core import (BlockPattern, block_grid, block_norms, block_sparsity, blocks_to_bsr,
                           bsr_to_weight, expand_block_mask, is_block, nonzero_blocks,
                           verify_state_dict, view_2d)
from mmsparse.core import FoldSpec, specs_from_patterns
from mmsparse.export.compressed import load_compressed, save_compressed, storage_sizes


def _ref_block(w, b, r, c):
    """Block (r, c) of a conv weight, written element by element from the SPEC formula:
    column j of the view is (kernel row, kernel col, input channel) with the input channel fastest."""
    o, i, kh, kw = w.shape
    out = torch.empty(b, b)
    for a in range(b):
        for d in range(b):
            col = c * b + d
            ky, rest = divmod(col, kw * i)
            kx, ch = divmod(rest, i)
            out[a, d] = w[r * b + a, ch, ky, kx]
    return out


def test_conv_view_and_tiles_match_reference():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)  # view 8 x 36, blocks 4x4 -> grid 2 x 9
    assert block_grid(w.shape, 4) == (2, 9)
    assert view_2d(w).shape == (8, 36)
    norms = block_norms(w, 4)
    for r in range(2):
        for c in range(9):
            ref = _ref_block(w, 4, r, c)
            torch.testing.assert_close(norms[r, c], ref.norm())
    # a block mask expanded to weight shape zeros exactly the reference block's elements
    mask = torch.ones(2, 9)
    mask[1, 5] = 0
    zeroed = w * expand_block_mask(mask, w.shape, 4)
    assert torch.count_nonzero(_ref_block(zeroed, 4, 1, 5)) == 0
    assert torch.count_nonzero(zeroed) == w.numel() - 16
    assert nonzero_blocks(zeroed, 4).tolist() == mask.bool().tolist()


def test_linear_view_is_the_weight():
    w = torch.arange(1., 33.).reshape(4, 8)
    assert view_2d(w) is w
    got = w * expand_block_mask(torch.tensor([[1., 0., 1., 0.], [0., 1., 0., 1.]]), w.shape, 2)
    assert torch.equal(got[:2, 0:2], w[:2, 0:2]) and got[:2, 2:4].abs().sum() == 0
    assert got[2:, 0:2].abs().sum() == 0 and torch.equal(got[2:, 2:4], w[2:, 2:4])


def test_non_dividing_block_is_an_error():
    with pytest.raises(ValueError, match='do not tile'):
        block_grid((64, 3, 7, 7), 16)


def test_pattern_parsing_and_verifier_dispatch():
    assert is_block('block16') and is_block('block32@0.7') and not is_block('2:4')
    assert BlockPattern.parse('block16@0.7') == BlockPattern(16, 0.7)
    with pytest.raises(ValueError, match='look like'):
        BlockPattern.parse('blk16')
    w = torch.randn(32, 32)
    w[:16, :16] = 0
    state = {'a.weight': w, 'b.weight': torch.randn(8, 16)}
    assert verify_state_dict(state, specs_from_patterns({'a': 'block16@0.25', 'b': '2:4'}))[0].layer == 'b'
    bad = verify_state_dict(state, specs_from_patterns({'a': 'block16@0.5'}))
    assert len(bad) == 1 and '1/4 blocks are exactly zero, 2 required' in str(bad[0])
    w[16:, 16:] = 1e-30  # tiny is not zero
    assert verify_state_dict(state, specs_from_patterns({'a': 'block16@0.5'}))
    assert 'do not tile' in str(verify_state_dict(state, specs_from_patterns({'b': 'block16'}))[0])
    assert block_sparsity(w, 16) == 0.25


def test_bsr_roundtrip_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    keep = torch.rand(2, 9) > 0.6
    w = w * expand_block_mask(keep.float(), w.shape, 16)
    bsr = blocks_to_bsr(w, 16)
    assert bsr['values'].shape == (int(keep.sum()), 16, 16)
    ref = view_2d(w).to_sparse_bsr((16, 16))
    assert torch.equal(ref.values(), bsr['values']) and torch.equal(ref.col_indices(), bsr['col_indices'])
    assert torch.equal(ref.crow_indices(), bsr['crow_indices'])
    assert torch.equal(bsr_to_weight(bsr, w.shape, 16), w)
    path = str(tmp_path / 'w.safetensors')
    spec = FoldSpec('sapp', BlockPattern(16, 0.3))
    save_compressed(path, {'l.weight': w}, {'l': spec})
    back, _ = load_compressed(path)
    assert torch.equal(back['l.weight'], w)
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:  # only the non-zero blocks are stored
        assert torch.equal(f.get_tensor('l.weight::values'), ref.values())
        assert 'l.weight' not in set(f.keys())
    sizes = storage_sizes({'l.weight': w}, {'l': spec})
    assert sizes.layers_fp32 == int(keep.sum()) * 256 * 4 + (int(keep.sum()) + 3) * 8
    assert sizes.layers_fp32 < sizes.layers_dense_fp32


@pytest.mark.parametrize('shape,size', [((32, 16, 3, 3), 16), ((16, 4, 3, 3), 4), ((16, 8, 2, 2), 16),
                                        ((32, 48), 16)])
def test_block_multiply_equals_expanded_mask(shape, size):
    from mmsparse.core.blocks import block_multiply
    torch.manual_seed(0)
    w = torch.randn(shape)
    values = torch.randn(block_grid(shape, size))
    assert torch.equal(block_multiply(w, values, size), w * expand_block_mask(values, shape, size))


def test_min_share_means_at_least_that_share():
    w = torch.ones(8, 80)   # 10 blocks in one row
    w[:, :56] = 0           # 7 zero blocks
    # 0.7 * 10 is not 8
    assert verify_state_dict({'a.weight': w}, specs_from_patterns({'a': 'block8@0.7'})) == []
    assert len(verify_state_dict({'a.weight': w}, specs_from_patterns({'a': 'block8@0.71'}))) == 1
