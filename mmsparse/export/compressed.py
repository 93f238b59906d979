"""Compressed storage of a folded checkpoint, each layer in its pattern's form, in safetensors.

Format ``mmsparse-compressed/2`` (one ``.safetensors`` file):

* every layer with a packable pattern stores the tensors of its pattern's ``pack()`` under
  ``<layer>.weight::<field>``:

  - N:M (:class:`~mmsparse.core.NMPattern`): ``values`` ``(G, N)`` and bit-packed in-block
    ``indices`` (layout in :mod:`mmsparse.core.patterns`; 2:4 uses 2 bits per kept value, 1:16 4);
  - block (:class:`~mmsparse.core.BlockPattern`): the BSR arrays ``crow_indices``, ``col_indices``
    and ``values`` ``(nnz blocks, B, B)`` of the 2-D view (the layout of
    ``torch.sparse_bsr_tensor``; all-zero blocks are not stored);
  - quantized (:class:`~mmsparse.core.QuantGrid`, up to 16 bits): integer ``codes`` (int8 / int16)
    and per-channel ``scale``;
* every other tensor is stored as it is under its own key;
* header metadata (strings): ``format``; ``layers`` = JSON ``{key: {"shape": [...], "dtype": ...,
  **fold-meta entry}}``; ``meta`` = JSON of the checkpoint meta.

:func:`load_compressed` restores N:M and block layers bit-exactly (zeros stored as +0.0); quantized
layers come back as ``code · scale`` rounded once to float32, the value an integer kernel computes
(at most 1 ulp from the folded float weight). Files of the earlier N:M-only format
``mmsparse-nm/1`` are read too.
"""
import json
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..core.spec import FoldSpec
from ..utils import atomic_write

FORMAT = 'mmsparse-compressed/2'
_FORMAT_NM1 = 'mmsparse-nm/1'
_SEP = '::'


def _canonical_zeros(t: Tensor) -> Tensor:
    return torch.where(t == 0, torch.zeros_like(t), t) if t.is_floating_point() else t


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace('torch.', ''))


def save_compressed(path: str, state_dict: Mapping[str, Tensor], specs: Mapping[str, FoldSpec],
                    meta: Optional[dict] = None) -> None:
    """Write ``state_dict`` with every packable layer of ``specs`` compressed, atomically.

    Raises:
        KeyError: a declared layer has no weight in the state dict.
        ValueError: a weight breaks its pattern (fold and verify it first).
    """
    from safetensors.torch import save_file
    packed = {f'{layer}.weight': spec for layer, spec in specs.items() if spec.pattern.packable}
    missing = sorted(set(packed) - set(state_dict))
    if missing:
        raise KeyError(f'patterns declared for weights not in the state dict: {missing[:5]}')
    tensors: Dict[str, Tensor] = {}
    layers = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if key in packed:
            spec = packed[key]
            for field, tensor in spec.pattern.pack(_canonical_zeros(value)).items():
                tensors[f'{key}{_SEP}{field}'] = tensor.contiguous()
            layers[key] = dict(spec.to_meta(), shape=list(value.shape), dtype=str(value.dtype))
        else:
            tensors[key] = value.contiguous().clone()
    header = dict(format=FORMAT, layers=json.dumps(layers), meta=json.dumps(meta or {}))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _nm1_layers(header: dict) -> Dict[str, dict]:
    """The ``layers`` of an ``mmsparse-nm/1`` header (N:M only, same value/index layout)."""
    return {key: dict(pattern=f'{e["n"]}:{e["m"]}', shape=e['shape'], dtype='float32')
            for key, e in json.loads(header['nm_layers']).items()}


def load_compressed(path: str) -> Tuple[Dict[str, Tensor], dict]:
    """``(dense state dict, meta)`` from a file written by :func:`save_compressed`."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        header = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    if header.get('format') == FORMAT:
        layers = json.loads(header['layers'])
    elif header.get('format') == _FORMAT_NM1:
        layers = _nm1_layers(header)
    else:
        raise ValueError(f'{path} is not an {FORMAT} file (format={header.get("format")!r})')
    state: Dict[str, Tensor] = {}
    fields: Dict[str, Dict[str, Tensor]] = {}
    for key, value in raw.items():
        owner, sep, field = key.partition(_SEP)
        if sep and owner in layers:
            fields.setdefault(owner, {})[field] = value
        else:
            state[key] = value
    for key, entry in layers.items():
        pattern = FoldSpec.from_meta(entry).pattern
        weight = pattern.unpack(fields[key], entry['shape'])
        state[key] = weight.to(_dtype(entry.get('dtype', 'float32')))
    return state, json.loads(header['meta'])


@dataclass
class StorageSizes:
    """Bytes of tensor data (file headers excluded) for the storage options of one checkpoint."""

    dense_fp32: int
    dense_fp16: int
    compressed_fp32: int    # compressed layers packed, values fp32; other tensors fp32
    compressed_fp16: int    # the same with fp16 values and fp16 dense tensors
    layers_dense_fp32: int  # the compressed layers alone, dense fp32
    layers_fp32: int        # ... packed (fp32 values + indices / codes)
    layers_fp16: int        # ... packed with fp16 values

    def format(self) -> str:
        """Human-readable size table."""
        mb = 1 / 2 ** 20

        def row(label: str, value: int, ref: int) -> str:
            return f'{label:<40}{value * mb:10.2f} MiB  {value / max(ref, 1):7.2%} of dense fp32'

        return '\n'.join([
            row('whole checkpoint, dense fp32', self.dense_fp32, self.dense_fp32),
            row('whole checkpoint, dense fp16', self.dense_fp16, self.dense_fp32),
            row('whole checkpoint, compressed fp32', self.compressed_fp32, self.dense_fp32),
            row('whole checkpoint, compressed fp16', self.compressed_fp16, self.dense_fp32),
            row('compressed layers only, dense fp32', self.layers_dense_fp32,
                self.layers_dense_fp32),
            row('compressed layers only, packed fp32', self.layers_fp32, self.layers_dense_fp32),
            row('compressed layers only, packed fp16', self.layers_fp16, self.layers_dense_fp32),
        ])


def storage_sizes(state_dict: Mapping[str, Tensor], specs: Mapping[str, FoldSpec]) -> StorageSizes:
    """Sizes of ``state_dict`` stored dense (fp32/fp16) and compressed (fp32/fp16 values)."""
    packed = {f'{layer}.weight': spec for layer, spec in specs.items() if spec.pattern.packable}
    dense32 = dense16 = comp32 = comp16 = layers_dense = layers32 = layers16 = 0
    for key, value in state_dict.items():
        float_like = value.is_floating_point()
        b32 = value.numel() * (4 if float_like else value.element_size())
        b16 = value.numel() * (2 if float_like else value.element_size())
        dense32 += b32
        dense16 += b16
        if key in packed:
            pattern = packed[key].pattern
            p32, p16 = pattern.stored_nbytes(value, 4), pattern.stored_nbytes(value, 2)
            comp32, comp16 = comp32 + p32, comp16 + p16
            layers_dense, layers32, layers16 = layers_dense + b32, layers32 + p32, layers16 + p16
        else:
            comp32, comp16 = comp32 + b32, comp16 + b16
    return StorageSizes(dense32, dense16, comp32, comp16, layers_dense, layers32, layers16)


__all__ = ['FORMAT', 'StorageSizes', 'load_compressed', 'save_compressed', 'storage_sizes']
