"""Folding to plain mmdet checkpoints, verification, ONNX export, compressed storage.

Every compressed layer (MaxQ, CGMQ, SA++, ...) plugs in through :class:`mmsparse.core.CompressedLayer`
only (``folded_weight()`` and ``fold_spec()``; quantized layers through
:class:`mmsparse.core.QuantizedLayer`): nothing here imports a method package.
mmdeploy and onnx are imported lazily, inside the functions that need them.
"""
from .compressed import StorageSizes, load_compressed, save_compressed, storage_sizes
from .fold import (FOLD_META_KEY, FoldResult, build_model, compressed_layers, fold_checkpoint,
                   fold_model, fold_specs, fold_state_dict, load_source_checkpoint)
from .onnx import (build_ort_model, build_task_processor, export_onnx, first_test_image,
                   mmdeploy_compat, verify_onnx)
from .plain_config import plain_config
from .verify import (PatternViolationError, checkpoint_specs, load_plain_checkpoint,
                     verify_checkpoint, verify_folded)

__all__ = [
    'FOLD_META_KEY', 'FoldResult', 'PatternViolationError', 'build_model', 'checkpoint_specs',
    'compressed_layers', 'fold_checkpoint', 'fold_model', 'fold_specs', 'fold_state_dict',
    'load_plain_checkpoint', 'load_source_checkpoint', 'plain_config', 'verify_checkpoint',
    'verify_folded', 'StorageSizes', 'load_compressed', 'save_compressed', 'storage_sizes',
    'build_ort_model', 'build_task_processor', 'export_onnx', 'first_test_image', 'mmdeploy_compat',
    'verify_onnx'
]
