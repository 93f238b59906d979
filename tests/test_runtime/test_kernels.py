"""The sparse conv / linear kernels (CSR: ``torch.ops.mmsparse.nm_conv2d`` / ``nm_linear``; BSR:
``bsr_conv2d`` / ``bsr_linear``) against F.conv2d / F.linear on random weights with exact N:M zeros
or zero blocks."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from mmsparse.core.ext import kernels_available
from mmsparse.core.blocks import BlockPattern
from mmsparse.core.patterns import NMPattern
from mmsparse.runtime import from_csr, relative_error, to_csr
from runtime_helpers import block_weight, nm_weight

pytestmark = pytest.mark.skipif(not kernels_available(), reason='mmsparse._ext is not built')

PATTERNS = [NMPattern(1, 4), NMPattern(2, 4), NMPattern(2, 8), NMPattern(1, 16), NMPattern(3, 32)]


def conv(x, weight, bias, stride, padding, dilation=1, relu=False):
    csr = to_csr(weight)
    kh, kw = weight.shape[2:]
    return torch.ops.mmsparse.nm_conv2d(x, csr['values'], csr['channels'], csr['taps'], csr['row_ptr'],
                                        bias, kh, kw, stride, padding, dilation, relu)


def linear(x, weight, bias):
    csr = to_csr(weight)
    return torch.ops.mmsparse.nm_linear(x, csr['values'], csr['channels'], csr['row_ptr'], bias)


CONV_CASES = list(itertools.product(
    PATTERNS, [1, 3], [1, 2], [0, 1], [(1, 7, 9), (3, 13, 11)], [True, False]))


@pytest.mark.parametrize('pattern,k,stride,padding,size,bias', CONV_CASES,
                         ids=[f'{p}-k{k}-s{s}-p{pd}-{"x".join(map(str, z))}-{"b" if b else "nb"}'
                              for p, k, s, pd, z, b in CONV_CASES])
def test_conv_matches_f_conv2d(pattern, k, stride, padding, size, bias):
    n, h, w = size
    in_channels = 2 * pattern.m
    weight = nm_weight((24, in_channels, k, k), pattern, seed=k + stride)
    b = torch.randn(24) if bias else None
    x = torch.randn(n, in_channels, h, w)
    ref = F.conv2d(x, weight, b, stride, padding)
    out = conv(x, weight, b, stride, padding)
    assert out.shape == ref.shape
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize('shape,stride,padding,dilation', [
    ((70, 48, 3, 3), 2, 1, 1),     # out channels not a multiple of anything, stride 2 phases
    ((16, 32, 5, 5), 1, 2, 1),     # other kernel size
    ((16, 32, 3, 3), 1, 2, 2),     # dilation
    ((16, 32, 3, 3), 3, 1, 1),     # stride 3: 9 phase planes
    ((16, 32, 1, 1), 2, 1, 1),     # padded 1x1 stride 2
    ((8, 1024, 1, 1), 1, 0, 1),    # many input channels: several channel chunks
])
def test_conv_other_geometry(shape, stride, padding, dilation):
    weight = nm_weight(shape, NMPattern(1, 16))
    x = torch.randn(2, shape[1], 19, 23)
    b = torch.randn(shape[0])
    ref = F.conv2d(x, weight, b, stride, padding, dilation)
    assert relative_error(conv(x, weight, b, stride, padding, dilation), ref) < 1e-5


def test_conv_large_plane_and_empty_rows():
    """Many tiles per image, an all-zero output channel (bias only) and a non-contiguous input."""
    weight = nm_weight((32, 64, 3, 3), NMPattern(2, 8))
    weight[5] = 0
    b = torch.randn(32)
    x = torch.randn(1, 64, 41, 67).transpose(2, 3)
    out = conv(x, weight, b, 1, 1)
    assert relative_error(out, F.conv2d(x, weight, b, 1, 1)) < 1e-5
    assert torch.equal(out[0, 5], b[5].expand_as(out[0, 5]))


@pytest.mark.parametrize('shape,k', [((40, 1024, 1, 1), 1), ((24, 32, 3, 3), 3)])
def test_conv_relu_epilogue(shape, k):
    """The fused ReLU, also after several channel chunks and for rows with no non-zero in the last."""
    weight = nm_weight(shape, NMPattern(1, 16))
    weight[:8, shape[1] // 2:] = 0
    x, b = torch.randn(2, shape[1], 9, 10), torch.randn(shape[0])
    ref = torch.relu(F.conv2d(x, weight, b, 1, k // 2))
    out = conv(x, weight, b, 1, k // 2, relu=True)
    assert relative_error(out, ref) < 1e-5 and (out >= 0).all() and (out == 0).any()


@pytest.mark.parametrize('pattern', PATTERNS, ids=str)
@pytest.mark.parametrize('rows', [1, 7, 200])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_matches_f_linear(pattern, rows, bias):
    weight = nm_weight((40, 4 * pattern.m), pattern)
    b = torch.randn(40) if bias else None
    x = torch.randn(rows, 4 * pattern.m)
    assert relative_error(linear(x, weight, b), F.linear(x, weight, b)) < 1e-5


def test_csr_round_trip_is_exact():
    for shape in [(24, 32, 3, 3), (24, 32)]:
        weight = nm_weight(shape, NMPattern(2, 8))
        assert torch.equal(from_csr(to_csr(weight), shape), weight)


def test_thread_count_does_not_change_results():
    """A fixed work partition: 1 and 2 threads give bit-identical outputs."""
    weight = nm_weight((96, 64, 3, 3), NMPattern(1, 4))
    x = torch.randn(3, 64, 29, 31)
    lin_w, lin_x = nm_weight((100, 256), NMPattern(2, 8)), torch.randn(300, 256)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append((conv(x, weight, None, 2, 1), conv(x, weight, None, 1, 1),
                         linear(lin_x, lin_w, None)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_portable_loop_matches():
    """The portable loop (machines without AVX2 + FMA) computes the same convolution."""
    weight = nm_weight((20, 32, 3, 3), NMPattern(2, 8))
    x, b = torch.randn(2, 32, 11, 13), torch.randn(20)
    ref = F.conv2d(x, weight, b, 2, 1)
    isa = torch.ops.mmsparse.nm_kernel_isa()
    try:
        assert torch.ops.mmsparse.nm_kernel_isa(True) == 'portable'
        portable = conv(x, weight, b, 2, 1)
    finally:
        torch.ops.mmsparse.nm_kernel_isa(isa == 'portable')
    assert relative_error(portable, ref) < 1e-5
    assert torch.ops.mmsparse.nm_kernel_isa() == isa


@pytest.mark.parametrize('bad,match', [
    (lambda c: c.update(values=c['values'].double()), 'values must be a contiguous float32'),
    (lambda c: c.update(channels=c['channels'].flip(0)), 'channels must not decrease'),
    (lambda c: c.update(taps=c['taps'] + 9), 'kernel position out of range'),
    (lambda c: c.update(row_ptr=c['row_ptr'][:-1]), 'row_ptr'),
])
def test_kernel_refuses_bad_buffers(bad, match):
    weight = nm_weight((8, 16, 3, 3), NMPattern(1, 4))
    csr = to_csr(weight)
    bad(csr)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mmsparse.nm_conv2d(torch.randn(1, 16, 5, 5), csr['values'], csr['channels'], csr['taps'],
                                     csr['row_ptr'], None, 3, 3, 1, 1, 1)


def bsr_conv(x, weight, size, bias, stride, padding, dilation=1, relu=False):
    bsr = BlockPattern(size).pack(weight)
    kh, kw = weight.shape[2:]
    return torch.ops.mmsparse.bsr_conv2d(x, bsr['values'], bsr['col_indices'], bsr['crow_indices'], bias,
                                         kh, kw, stride, padding, dilation, relu)


BSR_CASES = list(itertools.product([4, 16], [1, 3], [1, 2], [0, 1], [(1, 7, 9), (3, 13, 11)], [True, False]))


@pytest.mark.parametrize('size,k,stride,padding,shape,bias', BSR_CASES,
                         ids=[f'b{b}-k{k}-s{s}-p{pd}-{"x".join(map(str, z))}-{"b" if bb else "nb"}'
                              for b, k, s, pd, z, bb in BSR_CASES])
def test_bsr_conv_matches_f_conv2d(size, k, stride, padding, shape, bias):
    n, h, w = shape
    weight = block_weight((32, 32, k, k), size, 0.7, seed=size + k)
    b = torch.randn(32) if bias else None
    x = torch.randn(n, 32, h, w)
    ref = F.conv2d(x, weight, b, stride, padding)
    out = bsr_conv(x, weight, size, b, stride, padding)
    assert out.shape == ref.shape and relative_error(out, ref) < 1e-5
    relu = bsr_conv(x, weight, size, b, stride, padding, relu=True)
    assert relative_error(relu, torch.relu(ref)) < 1e-5


@pytest.mark.parametrize('rows', [1, 37, 200])
def test_bsr_linear_matches_f_linear(rows):
    weight = block_weight((48, 128), 16, 0.6)
    x, b = torch.randn(rows, 128), torch.randn(48)
    bsr = BlockPattern(16).pack(weight)
    out = torch.ops.mmsparse.bsr_linear(x, bsr['values'], bsr['col_indices'], bsr['crow_indices'], b)
    assert relative_error(out, F.linear(x, weight, b)) < 1e-5


def test_bsr_threads_and_portable_loop():
    weight, x = block_weight((64, 64, 3, 3), 16, 0.8), torch.randn(2, 64, 23, 19)
    ref = F.conv2d(x, weight, None, 2, 1)
    threads, isa = torch.get_num_threads(), torch.ops.mmsparse.nm_kernel_isa()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(bsr_conv(x, weight, 16, None, 2, 1))
        torch.ops.mmsparse.nm_kernel_isa(True)
        portable = bsr_conv(x, weight, 16, None, 2, 1)
    finally:
        torch.set_num_threads(threads)
        torch.ops.mmsparse.nm_kernel_isa(isa == 'portable')
    assert torch.equal(outs[0], outs[1])
    assert relative_error(outs[0], ref) < 1e-5 and relative_error(portable, ref) < 1e-5


def test_bsr_refuses_bad_blocks():
    weight = block_weight((16, 32, 3, 3), 16, 0.5)
    bsr = BlockPattern(16).pack(weight)
    x = torch.randn(1, 32, 5, 5)
    with pytest.raises(RuntimeError, match='column block out of range'):
        torch.ops.mmsparse.bsr_conv2d(x, bsr['values'], bsr['col_indices'] + 100, bsr['crow_indices'], None,
                                      3, 3, 1, 1, 1)
    with pytest.raises(RuntimeError, match='block size must divide the input channels'):
        torch.ops.mmsparse.bsr_conv2d(torch.randn(1, 24, 5, 5), bsr['values'], bsr['col_indices'],
                                      bsr['crow_indices'], None, 3, 3, 1, 1, 1)
