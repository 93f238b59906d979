import json

import pytest
import torch

from mmsparse.core import NMPattern
from mmsparse.core.masks import hard_nm_mask
from mmsparse.export.compressed import (FORMAT, _pack, _unpack, compress_weight, index_bits,
                                        load_compressed, save_compressed, storage_sizes)


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize('bits,m', [(1, 2), (2, 4), (4, 16), (4, 8), (8, 32)])
def test_pack_round_trip(bits, m):
    assert index_bits(m) == bits
    idx = torch.randint(0, m, (1001,))
    assert torch.equal(_unpack(_pack(idx, bits), bits, idx.numel()), idx)
    assert _pack(idx, bits).numel() == -(-1001 * bits // 8)


@pytest.mark.parametrize('n,m,shape', [(1, 16, (32, 64, 3, 3)), (2, 4, (16, 8, 1, 1)),
                                       (2, 8, (24, 64))])
def test_round_trip_bit_exact(tmp_path, n, m, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w = w * hard_nm_mask(w, n, m)
    w[0].zero_()  # blocks with fewer than N non-zeros
    w = torch.where(w == 0, torch.zeros_like(w), w)
    values, indices = compress_weight(w, NMPattern(n, m))
    assert values.shape == (w.numel() // m, n)
    state = {'layer.weight': w, 'layer.bias': torch.randn(shape[0]),
             'bn.num_batches_tracked': torch.tensor(7), 'half': torch.randn(3).half()}
    path = str(tmp_path / 'm.safetensors')
    save_compressed(path, state, {'layer': f'{n}:{m}'}, meta={'source_sha256': 'ab'})
    restored, meta = load_compressed(path)
    assert meta == {'source_sha256': 'ab'} and set(restored) == set(state)
    for key, value in state.items():
        assert restored[key].dtype == value.dtype and restored[key].shape == value.shape
        if value.is_floating_point():
            assert torch.equal(_bits(restored[key]), _bits(value)), key  # bit-exact
        else:
            assert torch.equal(restored[key], value)


def test_refuses_broken_pattern(tmp_path):
    w = torch.ones(4, 16)
    with pytest.raises(ValueError, match='breaks the 1:16'):
        save_compressed(str(tmp_path / 'x.safetensors'), {'l.weight': w}, {'l': '1:16'})
    assert not list(tmp_path.iterdir())


def test_folded_checkpoint_round_trip_and_sizes(folded, tmp_path):
    ckpt = torch.load(folded.checkpoint, map_location='cpu', weights_only=True)
    state, meta = ckpt['state_dict'], ckpt['meta']
    patterns = {k: v['pattern'] for k, v in meta['mmsparse_fold']['layers'].items()}
    path = str(tmp_path / 'folded.safetensors')
    save_compressed(path, state, patterns, meta)
    restored, meta2 = load_compressed(path)
    assert meta2['mmsparse_fold']['layers'] == json.loads(json.dumps(meta['mmsparse_fold']['layers']))
    for key, value in state.items():
        if value.is_floating_point():
            assert torch.equal(_bits(restored[key]), _bits(value)), key
        else:
            assert torch.equal(restored[key], value), key
    sizes = storage_sizes(state, patterns)
    print('\n' + sizes.format())
    # the 1:16 backbone layers alone
    nm16 = {k: p for k, p in patterns.items() if p == '1:16'}
    s16 = storage_sizes({f'{k}.weight': state[f'{k}.weight'] for k in nm16}, nm16)
    print(f'1:16 layers: {s16.nm_layers_fp32 / s16.nm_layers_dense_fp32:.2%} of dense fp32 '
          f'(fp16 values {s16.nm_layers_fp16 / s16.nm_layers_dense_fp32:.2%})')
    assert s16.nm_layers_fp32 < s16.nm_layers_dense_fp32 / 8
    assert s16.nm_layers_fp16 < s16.nm_layers_dense_fp32 / 8
    assert sizes.nm_fp32 < sizes.dense_fp32 and sizes.dense_fp16 * 2 == sizes.dense_fp32 + \
        sum(v.numel() * v.element_size() for v in state.values() if not v.is_floating_point())
    import os
    file_bytes = os.path.getsize(path)
    print(f'file: {file_bytes / 2**20:.2f} MiB vs torch.save dense '
          f'{os.path.getsize(folded.checkpoint) / 2**20:.2f} MiB')
    assert abs(file_bytes - sizes.nm_fp32) < 0.02 * sizes.nm_fp32 + 65536
    with open(path, 'rb') as f:
        assert FORMAT.encode() in f.read(1 << 16)
