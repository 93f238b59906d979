import pytest
import torch
from torch import nn

from mmsparse.core import (NMPattern, from_blocks, hard_nm_mask, model_report, nm_incompatibility,
                           specs_from_patterns, to_blocks, verify_state_dict)


@pytest.mark.parametrize('n,m', [(0, 4), (4, 4), (5, 4), (-1, 2)])
def test_invalid_pattern(n, m):
    with pytest.raises(ValueError, match='1 <= N < M'):
        NMPattern(n, m)


def test_parse_pattern():
    assert NMPattern.parse('2:4') == NMPattern(2, 4)
    with pytest.raises(ValueError, match='look like'):
        NMPattern.parse('2-4')


def test_conv_block_layout_is_input_channels_at_fixed_position():
    w = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).reshape(2, 8, 3, 3)
    blocks = to_blocks(w, 4)
    assert blocks.shape == (2 * 3 * 3 * 2, 4)
    # first block: output 0, kernel (0, 0), input channels 0..3
    assert torch.equal(blocks[0], w[0, 0:4, 0, 0])
    # second block: same position, input channels 4..7
    assert torch.equal(blocks[1], w[0, 4:8, 0, 0])
    # third block: next kernel column
    assert torch.equal(blocks[2], w[0, 0:4, 0, 1])
    assert torch.equal(from_blocks(blocks, w.shape), w)


def test_linear_block_layout():
    w = torch.randn(3, 8)
    assert torch.equal(to_blocks(w, 4)[1], w[0, 4:8])
    assert torch.equal(from_blocks(to_blocks(w, 4), w.shape), w)


def test_incompatibility_reasons():
    assert 'not divisible' in nm_incompatibility(nn.Conv2d(6, 16, 3), 4)
    assert nm_incompatibility(nn.Conv2d(3, 16, 3), 4) == 'the 3-channel stem is dense by rule'
    assert nm_incompatibility(nn.Conv2d(3, 16, 3), 3) == 'the 3-channel stem is dense by rule'
    assert 'groups' in nm_incompatibility(nn.Conv2d(16, 16, 3, groups=4), 4)
    assert nm_incompatibility(nn.Conv2d(16, 16, 3), 4) is None
    assert nm_incompatibility(nn.Linear(32, 4), 16) is None


def test_hard_mask_keeps_n_largest_and_ties_go_to_lower_index():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 1.0, 1.0, 1.0, 1.0]])
    mask = hard_nm_mask(w, 2, 4)
    assert mask.tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]


def test_violations_name_the_block_and_verify_state_dict():
    w = torch.zeros(2, 8, 3, 3)
    w[1, 4:6, 2, 1] = 1.0   # two non-zeros in block (out 1, row 2, col 1, channels 4..7)
    (v,) = NMPattern(1, 4).violations('conv', w)
    assert v.block == (1, 2, 1, 4) and v.nonzeros == 2
    assert 'conv: block (1, 2, 1, 4) has 2 non-zeros' in str(v)
    assert verify_state_dict({'conv.weight': w}, specs_from_patterns({'conv': '2:4'})) == []
    assert len(verify_state_dict({'conv.weight': w}, specs_from_patterns({'conv': '1:4'}))) == 1
    with pytest.raises(KeyError, match='not in the checkpoint'):
        verify_state_dict({}, specs_from_patterns({'conv': '1:4'}))


def test_model_report_lists_plain_layers_as_dense():
    stats = model_report(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 2)))
    assert [s.pattern for s in stats] == ['dense', 'dense']
    assert stats[0].reason == 'not converted'
