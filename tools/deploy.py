"""Export a folded (plain mmdet) detector to ONNX with mmdeploy 1.3.1, in-process, then check it.

    python tools/deploy.py PLAIN_CONFIG FOLDED_CHECKPOINT --work-dir DIR \\
        [--deploy-cfg instance-seg_onnxruntime_dynamic] [--img IMG] [--compare] [--eval]

Steps: (1) ``mmdeploy.apis.torch2onnx`` under :func:`mmsparse.export.mmdeploy_compat` (fixes for
torch >= 2.9, undone afterwards); (2) the N:M patterns recorded in the folded checkpoint's meta are
verified again on the ONNX initializers; (3) ``--compare`` runs ONNX Runtime on the test split of the
config and prints its largest differences from the same (mmdeploy-rewritten) graph run in PyTorch
and from stock mmdet's predictions; (4) ``--eval`` computes the test metric (COCO mAP) of three
models: stock mmdet PyTorch, the exported graph run in PyTorch and ONNX Runtime.

ONNX Runtime vs the exported graph in PyTorch is the export/runtime error (should be ~0): it must
stay within ``--max-map-diff`` points. The exported graph vs stock mmdet is mmdeploy 1.3.1's own
post-processing deviation (one RPN NMS over all FPN levels, per-class caps in the box-head NMS,
docs/deployment.md section 3): reported, and checked only with ``--max-mmdeploy-gap``.
``--deploy-cfg`` takes a path or a name in ``configs/deploy/`` (default: the dynamic onnxruntime
config for detection or instance segmentation). ``--cfg-options`` edits the model config (e.g. the
test data root). Exit status 1 when a pattern is broken in the ONNX graph or a limit is exceeded.
Everything goes to ``<work-dir>/deploy_summary.json``.

``--runtime mmsparse`` also runs the folded model on mmsparse's sparse CPU runtime
(docs/deployment.md, section 3c): in PyTorch packed by ``mmsparse.runtime.pack`` and in ONNX Runtime
as ``end2end.mmsparse.onnx``, the exported graph with its N:M nodes rewritten into custom nodes
(``mmsparse.runtime.onnx``). The COCO mAP of each stands beside the dense model's in the same runtime
(stock mmdet PyTorch, ``end2end.onnx`` in ONNX Runtime) and must agree within ``--max-runtime-diff``
points; the time per image of all four is measured in interleaved rounds (``--bench-rounds``).
"""
import argparse
import json
import os.path as osp
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from mmengine.config import Config, DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a folded detector to ONNX (mmdeploy)')
    parser.add_argument('config', help='plain model config (written by tools/fold.py)')
    parser.add_argument('checkpoint', help='folded checkpoint (written by tools/fold.py)')
    parser.add_argument('--work-dir', required=True, help='output directory')
    parser.add_argument('--deploy-cfg', help='mmdeploy deploy config (path or configs/deploy/ name)')
    parser.add_argument('--img', help='image used for tracing (default: first test image)')
    parser.add_argument('--compare', action='store_true', help='compare ORT with PyTorch outputs')
    parser.add_argument('--eval', action='store_true',
                        help='test metric of stock mmdet, the exported graph in PyTorch and ORT')
    parser.add_argument('--max-map-diff', type=float, default=0.5,
                        help='with --eval: fail when |mAP(ONNX Runtime) - mAP(exported graph in '
                        'PyTorch)| exceeds this many points (export/runtime error)')
    parser.add_argument('--max-mmdeploy-gap', type=float, default=None,
                        help='with --eval: fail when |mAP(exported graph in PyTorch) - mAP(stock '
                        'mmdet)| exceeds this many points (default: report only)')
    parser.add_argument('--runtime', choices=['mmsparse'],
                        help="also evaluate the model on mmsparse's sparse CPU runtime, packed in PyTorch "
                        'and as the rewritten ONNX graph (docs/deployment.md, section 3c)')
    parser.add_argument('--patterns', help='with --runtime: JSON file {layer: "N:M"} (default: the '
                        "checkpoint's fold meta)")
    parser.add_argument('--tactic', choices=['auto', 'sparse', 'dense'], default='auto',
                        help='with --runtime: per-layer tactic, "auto" times sparse vs dense (default)')
    parser.add_argument('--max-runtime-diff', type=float, default=0.2,
                        help='with --runtime: fail when a sparse runtime\'s mAP differs from the dense '
                        'model\'s in the same runtime by more than this many points')
    parser.add_argument('--bench-rounds', type=int, default=5,
                        help='with --runtime: interleaved timing rounds per model on the first test '
                        'batch (0: no timing)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the model config, key=value pairs')
    return parser.parse_args(argv)


DOCS = 'docs/deployment.md, section 3'


def limit_error(candidate: str, cand: dict, reference: str, ref: dict, deltas: dict, option: str,
                limit: Optional[float], meaning: str) -> Optional[str]:
    """The failure message when the largest headline-mAP delta exceeds ``limit`` (None: no check)."""
    from mmsparse.export.evaluate import largest_map_delta
    key, delta = largest_map_delta(deltas)
    if limit is None or key is None or abs(delta) <= limit:
        return None
    return (f'error: {key}: {candidate} {cand[key]:.3f} vs {reference} {ref[key]:.3f} differ by '
            f'{abs(delta):.2f} points, more than {option} {limit:g} ({meaning}; change the limit '
            f'with {option}; see {DOCS})')


def evaluate_three(args: argparse.Namespace, cfg: Config, torch_model, graph_model,
                   ort_model) -> Tuple[dict, List[str]]:
    """COCO metrics of stock mmdet, the exported graph in PyTorch and ONNX Runtime on the test
    split, the two deltas (mAP points) and the messages of the limits exceeded."""
    from mmsparse.export.evaluate import evaluate_model, format_deltas, format_maps, metric_deltas
    stock, graph, ort = (evaluate_model(m, cfg) for m in (torch_model, graph_model, ort_model))
    export_error, gap = metric_deltas(graph, ort), metric_deltas(stock, graph)
    gap_limit = ('report only; --max-mmdeploy-gap sets a limit' if args.max_mmdeploy_gap is None
                 else f'limit --max-mmdeploy-gap {args.max_mmdeploy_gap:g}')
    print(f'COCO mAP on the test split:\n'
          f'  stock mmdet PyTorch:       {format_maps(stock)}\n'
          f'  exported graph in PyTorch: {format_maps(graph)}\n'
          f'  ONNX Runtime:              {format_maps(ort)}\n'
          f'  export/runtime error, ONNX Runtime - exported graph: {format_deltas(export_error)} '
          f'(limit --max-map-diff {args.max_map_diff:g})\n'
          f'  mmdeploy vs mmdet, exported graph - stock mmdet:     {format_deltas(gap)} ({gap_limit})\n'
          f'    not an export error: mmdeploy 1.3.1 runs one RPN NMS over the proposals of all FPN '
          f'levels (mmdet: one per level) and caps the box-head NMS per class; see {DOCS}')
    errors = [limit_error('ONNX Runtime', ort, 'exported graph in PyTorch', graph, export_error,
                          '--max-map-diff', args.max_map_diff, 'export/runtime error'),
              limit_error('exported graph in PyTorch', graph, 'stock mmdet PyTorch', stock, gap,
                          '--max-mmdeploy-gap', args.max_mmdeploy_gap,
                          "mmdeploy's post-processing vs stock mmdet, not an export error")]
    result = dict(metrics=dict(stock_mmdet=stock, exported_graph=graph, onnx_runtime=ort),
                  metric_deltas_points=dict(onnx_runtime_vs_exported_graph=export_error,
                                            exported_graph_vs_stock_mmdet=gap),
                  limits_points=dict(max_map_diff=args.max_map_diff,
                                     max_mmdeploy_gap=args.max_mmdeploy_gap))
    return result, [e for e in errors if e]


def runtime_patterns(args: argparse.Namespace, checkpoint: dict) -> Mapping:
    """``{layer: FoldSpec}`` for ``--runtime``: from ``--patterns`` or the fold meta.

    Raises:
        ValueError: neither holds patterns, or the folded weights break them (names the layers).
    """
    from mmsparse.core.report import verify_state_dict
    from mmsparse.core.spec import specs_from_patterns
    from mmsparse.export.verify import PatternViolationError, checkpoint_specs
    if args.patterns:
        with open(args.patterns) as f:
            specs = specs_from_patterns(json.load(f))
    else:
        try:
            specs = checkpoint_specs(checkpoint, args.checkpoint)
        except ValueError as err:
            raise ValueError(f'--runtime mmsparse: {err} (a checkpoint written by tools/fold.py, or '
                             '--patterns layers.json)') from None
    if not any(spec.sparse for spec in specs.values()):
        raise ValueError('--runtime mmsparse: no sparse layer declared, nothing to run sparse')
    violations = verify_state_dict(checkpoint.get('state_dict', checkpoint), specs)
    if violations:
        raise PatternViolationError(violations)
    return specs


def first_batch(cfg: Config, model) -> tuple:
    """The first test batch (loader output) and its pre-processed input tensor."""
    from mmengine.runner import Runner
    loader = dict(cfg.test_dataloader, num_workers=0, persistent_workers=False)
    data = next(iter(Runner.build_dataloader(loader)))
    return data, model.data_preprocessor(data, False)['inputs']


def median_ms(calls: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Median milliseconds of each call over ``rounds`` interleaved rounds (order alternating)."""
    times: Dict[str, List[float]] = {key: [] for key in calls}
    for call in calls.values():  # warm-up
        call()
    for rnd in range(rounds):
        for key in (list(calls) if rnd % 2 == 0 else list(reversed(calls))):
            start = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - start)
    return {key: round(1e3 * statistics.median(values), 2) for key, values in times.items()}


def evaluate_runtime(args: argparse.Namespace, cfg: Config, processor, torch_model, ort_model,
                     onnx_file: str, specs: Mapping, known: Mapping[str, dict]) -> Tuple[dict, List[str]]:
    """COCO metrics of the packed PyTorch model and the rewritten ONNX graph beside the dense model's
    in each runtime (reusing ``known`` metric sets of ``--eval``), timings, limit messages."""
    import onnx
    import torch

    from mmsparse import runtime
    from mmsparse.export.evaluate import evaluate_model, format_deltas, format_maps, metric_deltas
    from mmsparse.runtime import onnx as rt_onnx
    data, batch = first_batch(cfg, torch_model)
    with torch.no_grad():
        packed = runtime.pack(processor.build_pytorch_model(args.checkpoint), specs, tactic=args.tactic,
                              example_inputs=lambda m: m.extract_feat(batch))
    input_name = ort_model.wrapper.sess.get_inputs()[0].name
    rewritten = rt_onnx.rewrite(onnx_file, specs, tactic=args.tactic, check_outputs=False,
                                example_inputs={input_name: batch.numpy()})
    print(rewritten.format())
    sparse_file = osp.splitext(onnx_file)[0] + '.mmsparse.onnx'
    onnx.save(rewritten.model, sparse_file)
    sparse_ort = rt_onnx.with_session(ort_model, rt_onnx.inference_session(sparse_file))
    metrics = dict(stock_mmdet=known.get('stock_mmdet') or evaluate_model(torch_model, cfg),
                   packed_pytorch=evaluate_model(packed, cfg),
                   onnx_runtime=known.get('onnx_runtime') or evaluate_model(ort_model, cfg),
                   rewritten_onnx_runtime=evaluate_model(sparse_ort, cfg))
    deltas = dict(packed_vs_stock_mmdet=metric_deltas(metrics['stock_mmdet'], metrics['packed_pytorch']),
                  rewritten_vs_onnx_runtime=metric_deltas(metrics['onnx_runtime'],
                                                          metrics['rewritten_onnx_runtime']))
    layers = {t: sum(r.tactic == t for r in packed.mmsparse_pack_report) for t in ('sparse', 'dense')}
    result = dict(sparse_onnx_file=sparse_file, tactic=args.tactic, metrics=metrics,
                  metric_deltas_points=deltas, max_runtime_diff=args.max_runtime_diff, packed_layers=layers,
                  onnx_nodes=rewritten.counts(), onnx_layers_missing=rewritten.missing)
    m = {k: format_maps(v) for k, v in metrics.items()}
    print(f'mmsparse runtime, COCO mAP on the test split (tactic {args.tactic}):\n'
          f'  PyTorch:      dense (stock mmdet) {m["stock_mmdet"]} | packed {m["packed_pytorch"]} '
          f'({format_deltas(deltas["packed_vs_stock_mmdet"])}; {layers["sparse"]} layers sparse, '
          f'{layers["dense"]} dense tactic)\n'
          f'  ONNX Runtime: dense end2end.onnx {m["onnx_runtime"]} | rewritten '
          f'{m["rewritten_onnx_runtime"]} ({format_deltas(deltas["rewritten_vs_onnx_runtime"])}; '
          f'{rewritten.counts()["sparse"]} nodes sparse)')
    if args.bench_rounds > 0:
        calls = dict(pytorch_dense=lambda: torch_model.test_step(data),
                     pytorch_packed=lambda: packed.test_step(data),
                     ort_dense=lambda: ort_model.test_step(data),
                     ort_rewritten=lambda: sparse_ort.test_step(data))
        with torch.no_grad():
            ms = median_ms(calls, args.bench_rounds)
        result['ms_per_batch'] = ms
        print(f'  time per test batch (median of {args.bench_rounds} interleaved rounds, first batch): '
              f'PyTorch {ms["pytorch_dense"]:.1f} -> {ms["pytorch_packed"]:.1f} ms '
              f'({ms["pytorch_dense"] / ms["pytorch_packed"]:.2f}x), ONNX Runtime {ms["ort_dense"]:.1f} -> '
              f'{ms["ort_rewritten"]:.1f} ms ({ms["ort_dense"] / ms["ort_rewritten"]:.2f}x)')
    errors = [limit_error('packed PyTorch', metrics['packed_pytorch'], 'stock mmdet PyTorch',
                          metrics['stock_mmdet'], deltas['packed_vs_stock_mmdet'], '--max-runtime-diff',
                          args.max_runtime_diff, 'sparse runtime error'),
              limit_error('rewritten ONNX Runtime', metrics['rewritten_onnx_runtime'], 'ONNX Runtime',
                          metrics['onnx_runtime'], deltas['rewritten_vs_onnx_runtime'], '--max-runtime-diff',
                          args.max_runtime_diff, 'sparse runtime error')]
    return result, [e for e in errors if e]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from mmdet.utils import register_all_modules

    from mmsparse.export import (build_ort_model, build_task_processor, export_onnx,
                                 first_test_image, verify_onnx)
    from mmsparse.export.evaluate import compare_graph_outputs, compare_models, exported_graph_model
    from mmsparse.export.verify import PatternViolationError, checkpoint_specs
    from mmsparse.utils import write_json
    register_all_modules()

    ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    runtime_specs = None
    if args.runtime:  # every refusal before the export starts
        try:
            runtime_specs = runtime_patterns(args, ckpt)
            from mmsparse.runtime import onnx as rt_onnx
            from mmsparse.runtime.layers import ensure_kernels
            rt_onnx.register_custom_ops()
            if args.tactic != 'dense':
                ensure_kernels()
        except PatternViolationError as err:
            print(f'error: --runtime mmsparse: {err}', file=sys.stderr)
            return 1
        except (ValueError, ImportError, RuntimeError) as err:
            print(f'error: {err}', file=sys.stderr)
            return 2

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    img = args.img or first_test_image(cfg)
    result = export_onnx(cfg, args.checkpoint, args.work_dir, img, args.deploy_cfg)
    summary = dict(onnx_file=result.onnx_file, export_seconds=round(result.seconds, 2),
                   onnx_bytes=result.size_bytes)
    print(f'exported {result.onnx_file} ({result.size_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s')

    try:
        specs = checkpoint_specs(ckpt, args.checkpoint)
    except ValueError:  # a plain checkpoint: nothing declared
        specs = {}
    violations, missing = verify_onnx(result.onnx_file, specs)
    checked = sum(spec.sparse for spec in specs.values()) - len(missing)
    print(f'ONNX pattern check: {checked} layers verified, {len(missing)} not found '
          f'{missing[:5] if missing else ""}')
    summary.update(onnx_layers_verified=checked, onnx_layers_missing=missing)
    status = 0
    if violations:
        print(str(PatternViolationError(violations)), file=sys.stderr)
        status = 1

    if args.compare or args.eval or args.runtime:
        processor = build_task_processor(cfg, args.deploy_cfg)
        ort_model = build_ort_model(processor, result.onnx_file)
        torch_model = processor.build_pytorch_model(args.checkpoint)
        if args.compare:
            diffs = compare_graph_outputs(torch_model, ort_model, cfg, processor.deploy_cfg)
            print('ONNX Runtime vs the exported computation in PyTorch (max abs diff):', diffs)
            summary['graph_parity'] = diffs
            stats = compare_models(torch_model, ort_model, cfg)
            print('ONNX Runtime vs stock mmdet PyTorch:', stats.format())
            summary['parity'] = {k: v for k, v in vars(stats).items() if k != 'per_image'}
        if args.eval:
            graph_model = exported_graph_model(ort_model, torch_model, processor.deploy_cfg)
            evaluation, errors = evaluate_three(args, cfg, torch_model, graph_model, ort_model)
            summary.update(evaluation)
            for error in errors:
                print(error, file=sys.stderr)
                status = 1
        if args.runtime:
            known = summary.get('metrics', {})
            summary['runtime'], errors = evaluate_runtime(args, cfg, processor, torch_model, ort_model,
                                                          result.onnx_file, runtime_specs, known)
            for error in errors:
                print(error, file=sys.stderr)
                status = 1
    write_json(osp.join(args.work_dir, 'deploy_summary.json'), summary)
    return status


if __name__ == '__main__':
    sys.exit(main())
