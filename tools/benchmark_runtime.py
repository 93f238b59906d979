"""mmsparse's CPU runtime against dense PyTorch on mmdet ResNet backbones with exact sparse weights.

For each depth (``--depths``, default 50 and 18) and pattern (``--patterns``, default 1:16 2:8 2:4;
block patterns such as ``block16@0.7`` too): an ``mmdet.models.backbones.ResNet`` with random
weights, every eligible conv made exactly sparse (N:M: the N largest magnitudes of each block kept,
the 3-channel stem stays dense; blocks: the SA++ layers with at least 100 blocks, the smallest-norm
share of blocks zeroed), eval mode, is packed
with :func:`mmsparse.runtime.pack` (``tactic='auto'``: each layer timed dense vs sparse on its real
input, the faster kept; outputs checked against the dense model) and timed against the dense model
on one ``--size`` x ``--size`` image, batch ``--batch``, ``--threads`` intra-op threads:

* per layer type (1x1 / 3x3, stride): every conv of that type run alone on its captured input,
  dense weight vs packed layer, summed;
* the whole backbone (stem, batch norms, ReLUs and residual adds included), also against the dense
  model with the same fusion (``pack(..., tactic='dense')``: batch norms folded into the convs, ReLUs
  fused), to show how much of the gain the fusion alone gives.

Every timing is the median of ``--rounds`` interleaved rounds (dense, packed; packed, dense; ...) after
a warm-up, so both see the same machine load; the ratios dense / packed come from the same run.

    python tools/benchmark_runtime.py [--depths 50 18] [--patterns 1:16 2:8 2:4 block16@0.9] [--size 512]
        [--threads 2] [--rounds 7] [--out work_dirs/benchmarks/runtime.json]
"""
import argparse
import copy
import json
import math
import os
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mmsparse.core.blocks import BlockPattern, block_incompatibility, block_norms, expand_block_mask
from mmsparse.core.masks import hard_nm_mask
from mmsparse.core.patterns import NMPattern, nm_incompatibility
from mmsparse.core.spec import Pattern, parse_pattern
from mmsparse.runtime import PackedLayer, pack, relative_error, tactics, weight_bytes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--depths', type=int, nargs='+', default=[50, 18])
    parser.add_argument('--patterns', nargs='+', default=['1:16', '2:8', '2:4'])
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--out', default=None, help='write the results as JSON here')
    return parser.parse_args()


def sparse_resnet(depth: int, pattern: Pattern, seed: int = 0) -> Tuple[nn.Module, Dict[str, str]]:
    """A random mmdet ResNet whose eligible convs hold exact ``pattern`` weights: N:M on every conv
    but the stem; for ``block<B>@<share>`` the SA++ rule (layers with at least 100 blocks), the
    smallest-norm blocks zeroed."""
    from mmdet.models.backbones import ResNet
    torch.manual_seed(seed)
    model = ResNet(depth=depth, out_indices=(0, 1, 2, 3))
    model.eval()
    declared = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        weight = module.weight.data
        if isinstance(pattern, NMPattern) and nm_incompatibility(module, pattern.m) is None:
            weight *= hard_nm_mask(weight, pattern.n, pattern.m)
        elif isinstance(pattern, BlockPattern) and block_incompatibility(module, pattern.size, 100) is None:
            norms = block_norms(weight, pattern.size)
            zero = math.ceil(pattern.min_sparsity * norms.numel() - 1e-6)
            keep = torch.ones(norms.numel())
            keep[norms.flatten().argsort()[:zero]] = 0
            weight *= expand_block_mask(keep.view_as(norms), weight.shape, pattern.size)
        else:
            continue
        declared[name] = str(pattern)
    return model, declared


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved rounds (order alternating)."""
    times: Dict[str, List[float]] = defaultdict(list)
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for key in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            start = time.perf_counter()
            fns[key]()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def layer_type(conv: nn.Conv2d) -> str:
    return f'{conv.kernel_size[0]}x{conv.kernel_size[1]} s{conv.stride[0]}'


def capture_inputs(model: nn.Module, names: List[str], x: torch.Tensor) -> Dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    inputs = {}
    handles = [modules[n].register_forward_pre_hook(
        lambda _, args, n=n: inputs.setdefault(n, args[0].clone())) for n in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return inputs


def bench(depth: int, pattern: Pattern, args: argparse.Namespace) -> dict:
    dense, declared = sparse_resnet(depth, pattern)
    x = torch.randn(args.batch, 3, args.size, args.size)
    start = time.perf_counter()
    packed = pack(copy.deepcopy(dense), declared, example_inputs=x, tactic='auto', repeats=args.rounds)
    pack_s = time.perf_counter() - start
    chosen = tactics(packed)
    inputs = capture_inputs(dense, list(declared), x)
    dense_modules, packed_modules = dict(dense.named_modules()), dict(packed.named_modules())
    by_type: Dict[str, List[str]] = defaultdict(list)
    for name in declared:
        by_type[layer_type(dense_modules[name])].append(name)
    rows = {}
    with torch.no_grad():
        for kind, names in sorted(by_type.items()):
            def run_dense(names=names):
                for n in names:
                    m = dense_modules[n]
                    F.conv2d(inputs[n], m.weight, m.bias, m.stride, m.padding, m.dilation)

            def run_packed(names=names):
                for n in names:
                    packed_modules[n](inputs[n])
            t = interleaved(dict(dense=run_dense, packed=run_packed), args.rounds)
            rows[kind] = dict(layers=len(names), sparse=sum(chosen[n] == 'sparse' for n in names),
                              dense_ms=t['dense'] * 1e3, packed_ms=t['packed'] * 1e3)
        fused_dense = pack(copy.deepcopy(dense), declared, example_inputs=x, tactic='dense')
        t = interleaved(dict(dense=lambda: dense(x), fused=lambda: fused_dense(x), packed=lambda: packed(x)),
                        args.rounds)
        rows['backbone'] = dict(layers=len(declared), sparse=sum(v == 'sparse' for v in chosen.values()),
                                dense_ms=t['dense'] * 1e3, packed_ms=t['packed'] * 1e3,
                                fused_dense_ms=t['fused'] * 1e3)
        err = max(relative_error(a, b) for a, b in zip(packed(x), dense(x)))
    sparse_layers = [m for m in packed.modules() if isinstance(m, PackedLayer) and m.tactic == 'sparse']
    return dict(depth=depth, pattern=str(pattern), rows=rows, pack_s=pack_s, max_rel_err=err,
                dense_weight_bytes=weight_bytes(dense), packed_weight_bytes=weight_bytes(packed),
                sparse_layers=len(sparse_layers))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    results = []
    shape = f'{args.batch}x3x{args.size}x{args.size}'
    print(f'torch {torch.__version__}, {args.threads} thread(s), input {shape}, median of {args.rounds} '
          'interleaved rounds; ratio = dense / packed (> 1: packed faster)')
    for depth in args.depths:
        for text in args.patterns:
            res = bench(depth, parse_pattern(text), args)
            results.append(res)
            print(f'\nResNet-{depth} {text}: packed in {res["pack_s"]:.1f} s, {res["sparse_layers"]} layers '
                  f'on the sparse tactic, weights {res["dense_weight_bytes"] / 2**20:.1f} -> '
                  f'{res["packed_weight_bytes"] / 2**20:.1f} MiB, max rel. error {res["max_rel_err"]:.1e}')
            print('| part | layers (sparse tactic) | dense ms | packed ms | ratio |')
            print('| --- | --- | --- | --- | --- |')
            for kind, row in res['rows'].items():
                print(f'| {kind} | {row["layers"]} ({row["sparse"]}) | {row["dense_ms"]:.1f} | '
                      f'{row["packed_ms"]:.1f} | {row["dense_ms"] / row["packed_ms"]:.2f}x |')
            row = res['rows']['backbone']
            print(f'| backbone, dense with the same BN/ReLU fusion | | {row["fused_dense_ms"]:.1f} | '
                  f'{row["packed_ms"]:.1f} | {row["fused_dense_ms"] / row["packed_ms"]:.2f}x |')
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), torch=torch.__version__, results=results), f, indent=1)


if __name__ == '__main__':
    main()
