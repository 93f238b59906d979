"""CGMQ: constraint-guided mixed-precision quantization under a hard BOPs budget."""
from .bops import (BOPsRow, bit_histogram, bops_rows, cgmq_layers, format_bops_report,
                   full_precision_bops, min_bops, resolve_budget, total_bops, trace_macs)
from .hook import CGMQHook, greedy_reduction
from .layers import CGMQConv2d, CGMQLinear, CGMQMixin
from .optim_wrapper import CGMQAmpOptimWrapper, CGMQOptimWrapper, constraint_directions
from .quantizer import (BIT_WIDTHS, bits_from_gates, code_range, gate_values_for_bits,
                        nested_quantize, quantize_codes, scales)

__all__ = [
    'CGMQConv2d', 'CGMQLinear', 'CGMQMixin', 'CGMQHook', 'CGMQOptimWrapper', 'CGMQAmpOptimWrapper',
    'greedy_reduction', 'constraint_directions', 'trace_macs', 'BOPsRow', 'bops_rows',
    'total_bops', 'full_precision_bops', 'min_bops', 'resolve_budget', 'bit_histogram',
    'format_bops_report', 'cgmq_layers', 'BIT_WIDTHS', 'nested_quantize', 'quantize_codes',
    'scales', 'code_range', 'bits_from_gates', 'gate_values_for_bits'
]
