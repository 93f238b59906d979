"""SequentialAttention++: block sparsification with attention scores and ACDC phases.

Also the baselines in the same machinery: ACDC (magnitude selection, step schedule) and one-shot block
magnitude pruning (:class:`MagnitudeBlockConv2d` layers with the matching hook schedule).
"""
from .hook import SequentialAttentionHook
from .layers import (BlockSparseMixin, MagnitudeBlockConv2d, MagnitudeBlockLinear, SAPPConv2d,
                     SAPPLinear)
from .schedule import (PHASES, Phase, PhaseSchedule, cyclic_phases, parse_phases, ramp,
                       validate_phases)

__all__ = [
    'SequentialAttentionHook', 'BlockSparseMixin', 'SAPPConv2d', 'SAPPLinear',
    'MagnitudeBlockConv2d', 'MagnitudeBlockLinear', 'PHASES', 'Phase', 'PhaseSchedule',
    'cyclic_phases', 'parse_phases', 'ramp', 'validate_phases'
]
