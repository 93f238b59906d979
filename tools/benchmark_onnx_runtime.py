"""ONNX Runtime on an mmdet ResNet: the dense graph vs the graph rewritten by ``mmsparse.runtime.onnx``.

The backbone of ``tools/benchmark_runtime.py`` (random weights, every eligible conv exactly N:M, the
stem dense, eval mode) is exported with ``torch.onnx.export`` (batch norm folded into the conv weights,
as mmdeploy's export does), then rewritten twice: ``tactic='auto'`` (each node timed custom vs plain
on its captured input, the faster kept) and ``tactic='sparse'`` (every eligible node custom). The
three graphs run in ONNX Runtime with ``--threads`` intra-op threads (torch, which runs the custom
nodes, gets the same count) on one ``--size`` x ``--size`` image; each timing is the median of
``--rounds`` interleaved rounds after a warm-up, outputs checked against the dense graph.

With ``--config`` (e.g. ``configs/dense_mask-rcnn_r50_fpn_1x_coco.py``) the graph is instead mmdeploy's
end2end export of that detector (random weights, backbone convs exactly N:M), fed a random
``--size`` x ``--size`` input; its outputs are detections, so only each custom node is checked.

    python tools/benchmark_onnx_runtime.py [--config CONFIG | --depth 50] [--pattern 1:16] [--size 512]
        [--threads 2] [--kernel-threads N] [--rounds 7] [--out work_dirs/benchmarks/onnx_runtime.json]
"""
import argparse
import importlib.util
import json
import os.path as osp
import tempfile
from typing import Dict, Tuple

import numpy as np

import torch

from mmsparse.core.spec import parse_pattern
from mmsparse.runtime import onnx as rt_onnx
from mmsparse.runtime import relative_error

HERE = osp.dirname(osp.abspath(__file__))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', help='an mmdet detector config: benchmark its mmdeploy end2end graph '
                        '(random weights, backbone convs exactly --pattern) instead of a bare ResNet')
    parser.add_argument('--depth', type=int, default=50)
    parser.add_argument('--pattern', default='1:16')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--kernel-threads', type=int, default=None,
                        help="torch's intra-op threads, which run the custom nodes (default: --threads)")
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--out', default=None, help='write the results as JSON here')
    return parser.parse_args()


def runtime_benchmark():
    """``tools/benchmark_runtime.py`` as a module (its ``sparse_resnet`` and ``interleaved``)."""
    spec = importlib.util.spec_from_file_location('benchmark_runtime', osp.join(HERE, 'benchmark_runtime.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def detector_graph(config: str, pattern: str, size: int, work_dir: str) -> Tuple[str, Dict[str, str]]:
    """mmdeploy's end2end graph of ``config`` with random weights, every eligible backbone conv exactly
    ``pattern`` (the stem stays dense), traced on a ``size`` x ``size`` image; and the declared layers."""
    from mmengine.config import Config

    from mmsparse.core.masks import hard_nm_mask
    from mmsparse.core.patterns import nm_incompatibility
    from mmsparse.export import build_model, export_onnx
    cfg = Config.fromfile(config)
    cfg.model.backbone.init_cfg = None
    cfg_path = osp.join(work_dir, 'model.py')
    cfg.dump(cfg_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    nm, declared = parse_pattern(pattern), {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if (name.startswith('backbone.') and isinstance(module, torch.nn.Conv2d)
                    and nm_incompatibility(module, nm.m) is None):
                module.weight *= hard_nm_mask(module.weight, nm.n, nm.m)
                declared[name] = pattern
    checkpoint = osp.join(work_dir, 'model.pth')
    classes = tuple(f'class{i}' for i in range(cfg.model.roi_head.bbox_head.num_classes))
    torch.save(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(classes=classes))), checkpoint)
    image = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return export_onnx(cfg, checkpoint, work_dir, image).onnx_file, declared


def main() -> None:
    args = parse_args()
    args.kernel_threads = args.kernel_threads or args.threads
    torch.set_num_threads(args.kernel_threads)
    bench = runtime_benchmark()
    x = torch.randn(1, 3, args.size, args.size)
    feeds = {'input': x.numpy()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            path, declared = detector_graph(args.config, args.pattern, args.size, tmp)
        else:
            model, declared = bench.sparse_resnet(args.depth, parse_pattern(args.pattern))
            path = osp.join(tmp, 'resnet.onnx')
            torch.onnx.export(model, x, path, input_names=['input'], opset_version=11, dynamo=False)
        # detector outputs hold top-k / NMS selections: near-ties flip, so only the nodes are checked
        rewrites = {t: rt_onnx.rewrite(path, declared, tactic=t, example_inputs=feeds, threads=args.threads,
                                       check_outputs=not args.config) for t in ('auto', 'sparse')}
        sessions = dict(dense=rt_onnx.inference_session(path, args.threads),
                        **{t: rt_onnx.inference_session(r.model, args.threads) for t, r in rewrites.items()})
    outputs = {k: s.run(None, feeds) for k, s in sessions.items()}
    errors = {k: max(relative_error(torch.from_numpy(o), torch.from_numpy(ref)) if o.shape == ref.shape
                     else float('nan') for o, ref in zip(outputs[k], outputs['dense'])) for k in rewrites}
    seconds = bench.interleaved({k: (lambda s: lambda: s.run(None, feeds))(s) for k, s in sessions.items()},
                                args.rounds)
    ms = {k: 1e3 * v for k, v in seconds.items()}
    result = dict(config=args.config, depth=args.depth, pattern=args.pattern, size=args.size,
                  threads=args.threads, kernel_threads=args.kernel_threads, rounds=args.rounds, ms=ms,
                  speedup={k: ms['dense'] / ms[k] for k in rewrites},
                  nodes={k: r.counts() for k, r in rewrites.items()}, max_relative_error=errors,
                  auto_nodes=[vars(r) for r in rewrites['auto'].nodes])
    nodes = result['nodes']
    name = args.config or f'ResNet-{args.depth}'
    print(f'{name} {args.pattern}, {args.size}x{args.size}, {args.threads} ORT / {args.kernel_threads} '
          f'kernel threads, median of {args.rounds} interleaved rounds (ORT):\n'
          f'  dense graph:          {ms["dense"]:8.1f} ms\n'
          f'  rewritten, auto:      {ms["auto"]:8.1f} ms  {result["speedup"]["auto"]:.2f}x  '
          f'({nodes["auto"]["sparse"]} custom nodes, {nodes["auto"]["dense"]} kept plain)\n'
          f'  rewritten, all sparse: {ms["sparse"]:7.1f} ms  {result["speedup"]["sparse"]:.2f}x  '
          f'({nodes["sparse"]["sparse"]} custom nodes)\n'
          f'  max relative error vs dense: auto {errors["auto"]:.1e}, all sparse {errors["sparse"]:.1e}')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1, default=float)


if __name__ == '__main__':
    main()
