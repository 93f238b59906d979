"""Block-compressed (BSR) copy of folded block-sparse weights, and its size.

For every layer declared with a block pattern (``'block16'`` or ``'block16@0.7'``, as recorded by
``fold_info()`` of block-sparse layers) the 2-D view ``W.permute(0, 2, 3, 1).reshape(O, kh·kw·I)`` of
the folded weight is stored in BSR form: ``crow_indices`` (R + 1), ``col_indices`` (one per stored
block), ``values`` (stored blocks × B × B), i.e. the arrays of ``torch.sparse_bsr_tensor``. All-zero
blocks are not stored. The file is a NumPy ``.npz`` (no pickled objects), keys
``<layer>/crow_indices``, ``<layer>/col_indices``, ``<layer>/values``, ``<layer>/weight_shape``,
``<layer>/block_size``.
"""
import os
from typing import Dict, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..core.blocks import BlockPattern, blocks_to_bsr, bsr_to_weight, is_block
from ..utils import atomic_write

FIELDS = ('crow_indices', 'col_indices', 'values')


def model_block_patterns(model: nn.Module) -> Dict[str, str]:
    """``{layer name: block pattern}`` of the block-sparse layers of ``model`` (via ``fold_info``)."""
    patterns = {}
    for name, module in model.named_modules():
        if hasattr(module, 'fold_info'):
            pattern = module.fold_info()['pattern']
            if is_block(pattern):
                patterns[name] = pattern
    return patterns


def to_bsr(state_dict: Mapping[str, Tensor], patterns: Mapping[str, str]) -> Dict[str, dict]:
    """BSR arrays (plus weight shape and block size) of every block-pattern layer of a state dict."""
    out = {}
    for layer, text in patterns.items():
        if not is_block(text):
            continue
        weight = state_dict[f'{layer}.weight']
        size = BlockPattern.parse(text).size
        out[layer] = dict(blocks_to_bsr(weight, size), weight_shape=tuple(weight.shape),
                          block_size=size)
    return out


def bsr_nbytes(bsr: Mapping[str, dict]) -> int:
    """Bytes of the BSR arrays (values, column and row indices) of all layers."""
    return sum(entry[f].numel() * entry[f].element_size() for entry in bsr.values() for f in FIELDS)


def dense_nbytes(bsr: Mapping[str, dict]) -> int:
    """Bytes the same layers take as dense weights (values' dtype)."""
    return sum(int(np.prod(e['weight_shape'])) * e['values'].element_size() for e in bsr.values())


def save_bsr(bsr: Mapping[str, dict], path: str) -> int:
    """Write :func:`to_bsr` output as an ``.npz`` file; return the file size in bytes."""
    arrays = {}
    for layer, entry in bsr.items():
        for field in FIELDS:
            arrays[f'{layer}/{field}'] = entry[field].detach().cpu().numpy()
        arrays[f'{layer}/weight_shape'] = np.asarray(entry['weight_shape'], dtype=np.int64)
        arrays[f'{layer}/block_size'] = np.asarray(entry['block_size'], dtype=np.int64)

    def write(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return os.path.getsize(path)


def load_bsr(path: str) -> Dict[str, dict]:
    """Read a file written by :func:`save_bsr` back into :func:`to_bsr`'s structure."""
    out: Dict[str, dict] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            layer, _, field = key.rpartition('/')
            entry = out.setdefault(layer, {})
            value = data[key]
            if field == 'weight_shape':
                entry[field] = tuple(int(v) for v in value)
            elif field == 'block_size':
                entry[field] = int(value)
            else:
                entry[field] = torch.from_numpy(value)
    return out


def from_bsr(bsr: Mapping[str, dict]) -> Dict[str, Tensor]:
    """Dense ``{<layer>.weight: tensor}`` rebuilt from BSR arrays."""
    return {f'{layer}.weight': bsr_to_weight(e, e['weight_shape'], e['block_size'])
            for layer, e in bsr.items()}


def export_bsr(state_dict: Mapping[str, Tensor], patterns: Mapping[str, str], path: str) -> dict:
    """Write the BSR copy of a folded state dict; return sizes.

    Returns:
        dict: ``layers``, ``file_bytes`` (the ``.npz``), ``bsr_bytes`` (arrays in memory),
        ``dense_bytes`` (the same layers dense) and ``ratio`` = bsr_bytes / dense_bytes.
    """
    bsr = to_bsr(state_dict, patterns)
    if not bsr:
        raise ValueError('no layer with a block pattern to export in BSR form')
    file_bytes = save_bsr(bsr, path)
    nbytes, dense = bsr_nbytes(bsr), dense_nbytes(bsr)
    return dict(layers=len(bsr), file_bytes=file_bytes, bsr_bytes=nbytes, dense_bytes=dense,
                ratio=nbytes / max(dense, 1))
