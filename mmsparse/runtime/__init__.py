"""mmsparse's CPU runtime for folded sparse models: packed conv / linear layers and their kernels.

``pack(model, patterns)`` swaps the declared layers of a folded model for inference-only packed
layers running ``torch.ops.mmsparse.nm_conv2d`` / ``nm_linear`` (CSR) or ``bsr_conv2d`` /
``bsr_linear`` (B×B blocks) (``mmsparse/csrc/nm_conv.cpp``),
choosing per layer the faster of the sparse kernel and the dense op (``docs/runtime.md``).
"""
from .layers import (BlockSparseConv2d, BlockSparseLinear, FusedReLU, NMSparseConv2d, NMSparseLinear,
                     PackedLayer, coverage, from_csr, to_csr)
from .pack import LayerReport, load_packed, pack, relative_error, resolve_patterns, tactics, weight_bytes

__all__ = ['pack', 'load_packed', 'tactics', 'weight_bytes', 'resolve_patterns', 'relative_error',
           'LayerReport', 'PackedLayer', 'NMSparseConv2d', 'NMSparseLinear', 'BlockSparseConv2d',
           'BlockSparseLinear', 'FusedReLU', 'coverage',
           'to_csr', 'from_csr']
