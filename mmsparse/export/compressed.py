"""Compressed N:M storage of a folded checkpoint: kept values + per-block indices, in safetensors.

Format ``mmsparse-nm/1`` (one ``.safetensors`` file):

* For every layer declared ``N:M`` (weight ``W``, blocks ``B = to_blocks(W, M)`` of shape ``(G, M)``,
  i.e. ``M`` consecutive input channels at a fixed output channel and kernel position, see
  :mod:`mmsparse.core.patterns`):

  - ``<layer>.weight::values``: ``(G, N)`` tensor in the weight's dtype, the kept values of each block
    in increasing position order (a block with fewer than ``N`` non-zeros is padded with zeros at
    unused positions);
  - ``<layer>.weight::indices``: uint8 tensor, the ``G·N`` in-block positions, bit-packed with
    ``bits`` bits each (the smallest of 1, 2, 4, 8 with ``2**bits >= M``), little-endian within a byte
    (first position in the lowest bits). 2:4 uses 2 bits per kept value, 1:16 4 bits.
* Every other tensor is stored as it is under its own key.
* Header metadata (strings): ``format`` = ``'mmsparse-nm/1'``; ``nm_layers`` = JSON
  ``{key: {"shape": [...], "n": N, "m": M, "bits": b}}``; ``meta`` = JSON of the checkpoint meta.

:func:`load_compressed` restores the dense tensors bit-exactly (zeros are stored folded as +0.0).
"""
import json
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..core.patterns import NMPattern, from_blocks, to_blocks
from ..core.report import is_nm
from ..utils import atomic_write

FORMAT = 'mmsparse-nm/1'
_VALUES, _INDICES = '::values', '::indices'


def index_bits(m: int) -> int:
    """Bits per stored in-block position for block length ``m``."""
    for bits in (1, 2, 4, 8):
        if (1 << bits) >= m:
            return bits
    raise ValueError(f'block length M={m} > 256 is not supported by {FORMAT}')


def _pack(indices: Tensor, bits: int) -> Tensor:
    flat = indices.flatten().to(torch.uint8)
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def _unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)
    return values.flatten()[:count].to(torch.long)


def compress_weight(weight: Tensor, pattern: NMPattern) -> Tuple[Tensor, Tensor]:
    """``(values (G, N), indices (G, N))`` of an N:M weight.

    Raises:
        ValueError: a block has more than ``N`` non-zeros.
    """
    blocks = to_blocks(weight.detach(), pattern.m)
    nonzero = blocks != 0
    if int(nonzero.sum(dim=1).max()) > pattern.n:
        raise ValueError(f'weight breaks the {pattern} pattern; fold and verify it first')
    # non-zeros first (stable: by position), then zero positions as padding; keep N, sort by position
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :pattern.n]
    indices, _ = order.sort(dim=1)
    return blocks.gather(1, indices).contiguous(), indices


def decompress_weight(values: Tensor, indices: Tensor, shape, m: int) -> Tensor:
    """Dense weight of ``shape`` from :func:`compress_weight` output."""
    blocks = values.new_zeros(values.shape[0], m)
    blocks.scatter_(1, indices, values)
    return from_blocks(blocks, torch.Size(shape)).contiguous()


def _canonical_zeros(t: Tensor) -> Tensor:
    return torch.where(t == 0, torch.zeros_like(t), t) if t.is_floating_point() else t


def save_compressed(path: str, state_dict: Mapping[str, Tensor], patterns: Mapping[str, str],
                    meta: Optional[dict] = None) -> None:
    """Write ``state_dict`` with the ``{layer: 'N:M'}`` layers compressed (format above), atomically."""
    from safetensors.torch import save_file
    tensors: Dict[str, Tensor] = {}
    nm_layers = {}
    nm_keys = {f'{layer}.weight': NMPattern.parse(p) for layer, p in patterns.items() if is_nm(p)}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if key in nm_keys:
            pattern = nm_keys[key]
            values, indices = compress_weight(_canonical_zeros(value), pattern)
            bits = index_bits(pattern.m)
            tensors[key + _VALUES] = values
            tensors[key + _INDICES] = _pack(indices, bits)
            nm_layers[key] = dict(shape=list(value.shape), n=pattern.n, m=pattern.m, bits=bits)
        else:
            tensors[key] = value.contiguous().clone()
    missing = sorted(set(nm_keys) - set(nm_layers))
    if missing:
        raise KeyError(f'patterns declared for weights not in the state dict: {missing[:5]}')
    header = dict(format=FORMAT, nm_layers=json.dumps(nm_layers), meta=json.dumps(meta or {}))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_compressed(path: str) -> Tuple[Dict[str, Tensor], dict]:
    """``(dense state dict, meta)`` from a file written by :func:`save_compressed`."""
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        header = f.metadata() or {}
        if header.get('format') != FORMAT:
            raise ValueError(f'{path} is not an {FORMAT} file (format={header.get("format")!r})')
        raw = {k: f.get_tensor(k) for k in f.keys()}
    nm_layers = json.loads(header['nm_layers'])
    state: Dict[str, Tensor] = {}
    for key, value in raw.items():
        if key.endswith(_INDICES):
            continue
        if key.endswith(_VALUES):
            name = key[:-len(_VALUES)]
            info = nm_layers[name]
            count = value.numel()
            indices = _unpack(raw[name + _INDICES], info['bits'], count).view(value.shape)
            state[name] = decompress_weight(value, indices, info['shape'], info['m'])
        else:
            state[key] = value
    return state, json.loads(header['meta'])


@dataclass
class StorageSizes:
    """Bytes of tensor data (file headers excluded) for the storage options of one checkpoint."""

    dense_fp32: int
    dense_fp16: int
    nm_fp32: int        # N:M layers compressed, values fp32; other tensors fp32
    nm_fp16: int        # the same with fp16 values and fp16 dense tensors
    nm_layers_dense_fp32: int   # the N:M layers alone, dense fp32
    nm_layers_fp32: int         # the N:M layers alone, compressed (fp32 values + indices)
    nm_layers_fp16: int         # ... fp16 values + indices

    def format(self) -> str:
        """Human-readable size table."""
        mb = 1 / 2 ** 20

        def row(label: str, value: int, ref: int) -> str:
            return f'{label:<38}{value * mb:10.2f} MiB  {value / max(ref, 1):7.2%} of dense fp32'

        return '\n'.join([
            row('whole checkpoint, dense fp32', self.dense_fp32, self.dense_fp32),
            row('whole checkpoint, dense fp16', self.dense_fp16, self.dense_fp32),
            row('whole checkpoint, N:M fp32 values', self.nm_fp32, self.dense_fp32),
            row('whole checkpoint, N:M fp16', self.nm_fp16, self.dense_fp32),
            row('N:M layers only, dense fp32', self.nm_layers_dense_fp32, self.nm_layers_dense_fp32),
            row('N:M layers only, compressed fp32', self.nm_layers_fp32, self.nm_layers_dense_fp32),
            row('N:M layers only, compressed fp16', self.nm_layers_fp16, self.nm_layers_dense_fp32),
        ])


def storage_sizes(state_dict: Mapping[str, Tensor], patterns: Mapping[str, str]) -> StorageSizes:
    """Sizes of ``state_dict`` stored dense (fp32/fp16) and in the N:M format (fp32/fp16 values)."""
    nm_keys = {f'{layer}.weight': NMPattern.parse(p) for layer, p in patterns.items() if is_nm(p)}
    dense32 = dense16 = nm32 = nm16 = layers_dense = layers32 = layers16 = 0
    for key, value in state_dict.items():
        numel = value.numel()
        float_like = value.is_floating_point()
        b32 = numel * (4 if float_like else value.element_size())
        b16 = numel * (2 if float_like else value.element_size())
        dense32 += b32
        dense16 += b16
        if key in nm_keys:
            p = nm_keys[key]
            kept = numel // p.m * p.n
            index_bytes = -(-kept * index_bits(p.m) // 8)
            nm32 += kept * 4 + index_bytes
            nm16 += kept * 2 + index_bytes
            layers_dense += b32
            layers32 += kept * 4 + index_bytes
            layers16 += kept * 2 + index_bytes
        else:
            nm32 += b32
            nm16 += b16
    return StorageSizes(dense32, dense16, nm32, nm16, layers_dense, layers32, layers16)


__all__ = ['FORMAT', 'StorageSizes', 'compress_weight', 'decompress_weight', 'index_bits',
           'load_compressed', 'save_compressed', 'storage_sizes']
