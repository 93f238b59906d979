"""Folding to plain mmdet checkpoints, verification, ONNX export, compressed formats.

Every compressed layer (MaxQ, CGMQ, SA++, ...) plugs in through the fold protocol only:
``fold_info() -> dict(method=..., pattern=..., [reason=...])`` and ``folded_weight() -> Tensor``.
mmdeploy and onnx are imported lazily, inside the functions that need them.
"""
from .compressed import (StorageSizes, load_compressed, save_compressed, storage_sizes)
from .fold import (FOLD_META_KEY, FoldResult, PatternViolationError, build_model, fold_checkpoint,
                   fold_model, fold_state_dict, plain_config, verify_checkpoint, verify_folded)
from .onnx import (build_ort_model, build_task_processor, export_onnx, first_test_image,
                   mmdeploy_compat, verify_onnx)

__all__ = [
    'FOLD_META_KEY', 'FoldResult', 'PatternViolationError', 'build_model', 'fold_checkpoint',
    'fold_model', 'fold_state_dict', 'plain_config', 'verify_checkpoint', 'verify_folded',
    'StorageSizes', 'load_compressed', 'save_compressed', 'storage_sizes', 'build_ort_model',
    'build_task_processor', 'export_onnx', 'first_test_image', 'mmdeploy_compat', 'verify_onnx'
]
