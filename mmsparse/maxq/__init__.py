"""MaxQ (multi-axis query N:M sparsity) and its SR-STE and one-shot baselines."""
from .hook import MaxQHook
from .layers import (MaxQConv2d, MaxQLinear, NMSparseMixin, OneShotNMConv2d, OneShotNMLinear,
                     SRSTEConv2d, SRSTELinear)
from .mask import maxq_mask
from .optim_wrapper import NMSparseAmpOptimWrapper, NMSparseOptimWrapper
from .schedule import SCHEDULES, preserve_rate

__all__ = [
    'MaxQHook', 'MaxQConv2d', 'MaxQLinear', 'SRSTEConv2d', 'SRSTELinear', 'OneShotNMConv2d',
    'OneShotNMLinear', 'NMSparseMixin', 'maxq_mask', 'NMSparseOptimWrapper',
    'NMSparseAmpOptimWrapper', 'SCHEDULES', 'preserve_rate'
]
