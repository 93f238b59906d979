import json

import pytest
import torch

from mmsparse.core import FoldSpec, NMPattern, QuantGrid
from mmsparse.core.masks import hard_nm_mask
from mmsparse.core.patterns import index_bits, pack_indices, unpack_indices
from mmsparse.export.compressed import FORMAT, load_compressed, save_compressed, storage_sizes


def _spec(text):
    n, m = map(int, text.split(':'))
    return FoldSpec('maxq', NMPattern(n, m))


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize('bits,m', [(1, 2), (2, 4), (4, 16), (4, 8), (8, 32)])
def test_pack_round_trip(bits, m):
    assert index_bits(m) == bits
    idx = torch.randint(0, m, (1001,))
    packed = pack_indices(idx, bits)
    assert torch.equal(unpack_indices(packed, bits, idx.numel()), idx)
    assert packed.numel() == -(-1001 * bits // 8)
    # little-endian within a byte: the first index in the lowest bits
    per_byte = 8 // bits
    assert int(packed[0]) == sum(int(idx[i]) << (bits * i) for i in range(per_byte))


@pytest.mark.parametrize('n,m,shape', [(1, 16, (32, 64, 3, 3)), (2, 4, (16, 8, 1, 1)),
                                       (2, 8, (24, 64))])
def test_round_trip_bit_exact(tmp_path, n, m, shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w = w * hard_nm_mask(w, n, m)
    w[0].zero_()  # blocks with fewer than N non-zeros
    w = torch.where(w == 0, torch.zeros_like(w), w)
    values, indices = NMPattern(n, m).compress(w)
    assert values.shape == (w.numel() // m, n)
    state = {'layer.weight': w, 'layer.bias': torch.randn(shape[0]),
             'bn.num_batches_tracked': torch.tensor(7), 'half': torch.randn(3).half()}
    path = str(tmp_path / 'm.safetensors')
    save_compressed(path, state, {'layer': _spec(f'{n}:{m}')}, meta={'source_sha256': 'ab'})
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
        save_compressed(str(tmp_path / 'x.safetensors'), {'l.weight': w}, {'l': _spec('1:16')})
    assert not list(tmp_path.iterdir())


def test_folded_checkpoint_round_trip_and_sizes(folded, tmp_path):
    ckpt = torch.load(folded.checkpoint, map_location='cpu', weights_only=True)
    state, meta = ckpt['state_dict'], ckpt['meta']
    patterns = folded.specs
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
    nm16 = {k: p for k, p in patterns.items() if p.pattern == NMPattern(1, 16)}
    s16 = storage_sizes({f'{k}.weight': state[f'{k}.weight'] for k in nm16}, nm16)
    print(f'1:16 layers: {s16.layers_fp32 / s16.layers_dense_fp32:.2%} of dense fp32 '
          f'(fp16 values {s16.layers_fp16 / s16.layers_dense_fp32:.2%})')
    assert s16.layers_fp32 < s16.layers_dense_fp32 / 8
    assert s16.layers_fp16 < s16.layers_dense_fp32 / 8
    assert sizes.compressed_fp32 < sizes.dense_fp32 and sizes.dense_fp16 * 2 == sizes.dense_fp32 + \
        sum(v.numel() * v.element_size() for v in state.values() if not v.is_floating_point())
    import os
    file_bytes = os.path.getsize(path)
    print(f'file: {file_bytes / 2**20:.2f} MiB vs torch.save dense '
          f'{os.path.getsize(folded.checkpoint) / 2**20:.2f} MiB')
    assert abs(file_bytes - sizes.compressed_fp32) < 0.02 * sizes.compressed_fp32 + 65536
    with open(path, 'rb') as f:
        assert FORMAT.encode() in f.read(1 << 16)


def test_quantized_codes_round_trip(tmp_path):
    """Integer codes: int8 up to 8 bits, int16 up to 16; back as code · scale in float32."""
    torch.manual_seed(0)
    scale4 = (torch.rand(6) * 0.1 + 0.01).double()
    codes4 = torch.randint(-7, 8, (6, 8, 3, 3), dtype=torch.float64)
    scale16 = torch.tensor([1e-4])
    codes16 = torch.randint(-32767, 32768, (5, 12), dtype=torch.float64)
    state = {'a.weight': (codes4 * scale4.view(-1, 1, 1, 1)).float(),
             'b.weight': (codes16 * scale16.double()).float()}
    specs = {'a': FoldSpec('cgmq', QuantGrid(4, 8, tuple(scale4.tolist()), 0.1, False)),
             'b': FoldSpec('cgmq', QuantGrid(16, 8, tuple(scale16.tolist()), 0.1, True))}
    path = str(tmp_path / 'q.safetensors')
    save_compressed(path, state, specs)
    from safetensors import safe_open
    with safe_open(path, framework='pt') as f:
        assert f.get_tensor('a.weight::codes').dtype == torch.int8
        assert torch.equal(f.get_tensor('a.weight::codes').double(), codes4)
        assert f.get_tensor('b.weight::codes').dtype == torch.int16
    restored, _ = load_compressed(path)
    for key in state:  # one float32 rounding of code · scale, as the weights were built
        assert torch.equal(restored[key], state[key]), key
    sizes = storage_sizes(state, specs)
    assert sizes.layers_fp32 == 6 * 72 + 6 * 8 + 60 * 2 + 8
    off = dict(state, **{'a.weight': state['a.weight'] + 0.3 * scale4.float().view(-1, 1, 1, 1)})
    with pytest.raises(ValueError, match='off its w4a8 grid'):
        save_compressed(str(tmp_path / 'x.safetensors'), off, specs)


def test_reads_nm1_files(tmp_path):
    """Files of the earlier N:M-only format (``mmsparse-nm/1``) still load, written by hand here."""
    from safetensors.torch import save_file
    w = torch.tensor([[0., 2., 0., 0., 0., 0., 0., -3.]])  # 1:4, blocks [0 2 0 0] [0 0 0 -3]
    values = torch.tensor([[2.], [-3.]])
    indices = torch.tensor([1 | (3 << 2)], dtype=torch.uint8)  # 2 bits per index, little-endian
    header = dict(format='mmsparse-nm/1', meta=json.dumps({'k': 1}),
                  nm_layers=json.dumps({'l.weight': dict(shape=[1, 8], n=1, m=4, bits=2)}))
    path = str(tmp_path / 'old.safetensors')
    save_file({'l.weight::values': values, 'l.weight::indices': indices, 'l.bias': torch.ones(1)},
              path, metadata=header)
    state, meta = load_compressed(path)
    assert torch.equal(state['l.weight'], w) and torch.equal(state['l.bias'], torch.ones(1))
    assert meta == {'k': 1}
