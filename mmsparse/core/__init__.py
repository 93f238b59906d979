"""Patterns, block layouts, masks, reports, verification and NaN/inf checks shared by all methods
and by export."""
from .blocks import (BlockPattern, BlockViolation, block_grid, block_incompatibility, block_multiply,
                     block_norms, block_report, block_sparsity, block_violations, blocks_to_bsr,
                     bsr_to_weight, expand_block_mask, from_view_2d, is_block, nonzero_blocks,
                     view_2d)
from .finite import (ADVICE_DIVERGED, ADVICE_LOADED, NonFinite, check_finite, find_nonfinite,
                     finite_loss, layer_tensors, nonfinite_message)
from .masks import hard_nm_mask, hard_nm_mask_blocks, largest_indices, smallest_indices
from .patterns import (NMPattern, from_blocks, max_nonzeros_per_block, nm_incompatibility,
                       to_blocks)
from .report import (LayerStat, Violation, format_report, is_nm, model_report, nm_violations,
                     overall_sparsity, verify_state_dict)
from .ste import mask_ste

__all__ = [
    'NMPattern', 'to_blocks', 'from_blocks', 'nm_incompatibility', 'max_nonzeros_per_block',
    'hard_nm_mask', 'hard_nm_mask_blocks', 'smallest_indices', 'largest_indices', 'mask_ste',
    'LayerStat', 'Violation', 'is_nm', 'model_report', 'format_report', 'overall_sparsity', 'nm_violations',
    'verify_state_dict', 'BlockPattern', 'BlockViolation', 'is_block', 'view_2d', 'from_view_2d',
    'block_grid', 'block_incompatibility', 'block_multiply', 'block_norms', 'expand_block_mask',
    'nonzero_blocks', 'block_sparsity', 'block_violations', 'block_report', 'blocks_to_bsr', 'bsr_to_weight',
    'ADVICE_DIVERGED', 'ADVICE_LOADED', 'NonFinite', 'check_finite', 'find_nonfinite', 'finite_loss',
    'layer_tensors', 'nonfinite_message'
]
