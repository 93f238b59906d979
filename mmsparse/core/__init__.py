"""Patterns, block layouts, masks, reports, verification and NaN/inf checks shared by all methods
and by export."""
from .blocks import (BlockPattern, BlockViolation, block_grid, block_incompatibility, block_multiply,
                     block_norms, block_sparsity, block_violations, blocks_to_bsr, bsr_to_weight,
                     expand_block_mask, from_view_2d, is_block, nonzero_blocks, view_2d)
from .finite import (ADVICE_DIVERGED, ADVICE_LOADED, NonFinite, check_finite, find_nonfinite,
                     finite_loss, layer_tensors, nonfinite_message)
from .layers import CompressedConv2d, CompressedLinear, PatternLayer
from .masks import hard_nm_mask, hard_nm_mask_blocks, smallest_indices
from .patterns import NMPattern, Violation, from_blocks, nm_incompatibility, to_blocks
from .quant import GridViolation, QuantGrid
from .report import (LayerStat, format_report, layer_stat, model_report, overall_sparsity,
                     state_dict_report, verify_state_dict)
from .spec import (CompressedLayer, Dense, FoldSpec, Pattern, QuantizedLayer, parse_pattern,
                   specs_from_meta, specs_from_patterns)
from .ste import mask_ste

__all__ = [
    'NMPattern', 'Violation', 'to_blocks', 'from_blocks', 'nm_incompatibility',
    'hard_nm_mask', 'hard_nm_mask_blocks', 'smallest_indices',
    'mask_ste', 'LayerStat', 'layer_stat', 'model_report', 'state_dict_report',
    'format_report', 'overall_sparsity', 'verify_state_dict', 'BlockPattern', 'BlockViolation',
    'is_block', 'view_2d', 'from_view_2d', 'block_grid', 'block_incompatibility', 'block_multiply',
    'block_norms', 'expand_block_mask', 'nonzero_blocks', 'block_sparsity', 'block_violations',
    'blocks_to_bsr', 'bsr_to_weight', 'GridViolation', 'QuantGrid', 'CompressedLayer', 'Dense',
    'FoldSpec', 'Pattern', 'QuantizedLayer', 'parse_pattern', 'specs_from_meta',
    'specs_from_patterns', 'ADVICE_DIVERGED', 'ADVICE_LOADED', 'NonFinite', 'check_finite',
    'find_nonfinite', 'finite_loss', 'layer_tensors', 'nonfinite_message', 'CompressedConv2d',
    'CompressedLinear', 'PatternLayer'
]
