"""Export a folded (plain mmdet) detector to ONNX with mmdeploy 1.3.1, in-process, then check it.

    python tools/deploy.py PLAIN_CONFIG FOLDED_CHECKPOINT --work-dir DIR \\
        [--deploy-cfg instance-seg_onnxruntime_dynamic] [--img IMG] [--compare] [--eval]

Steps: (1) ``mmdeploy.apis.torch2onnx`` under :func:`mmsparse.export.mmdeploy_compat` (fixes for
torch >= 2.9, undone afterwards); (2) the N:M patterns recorded in the folded checkpoint's meta are
verified again on the ONNX initializers; (3) ``--compare`` runs ONNX Runtime on the test split of the
config and prints its largest differences from the same (mmdeploy-rewritten) graph run in PyTorch
and from stock mmdet's predictions; (4) ``--eval`` computes the test metric (COCO
mAP) through both. ``--deploy-cfg`` takes a path or a name in ``configs/deploy/`` (default: the
dynamic onnxruntime config for detection or instance segmentation). ``--cfg-options`` edits the model
config (e.g. the test data root). Exit status 1 when a pattern is broken in the ONNX graph or when
``--max-map-diff`` is exceeded.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a folded detector to ONNX (mmdeploy)')
    parser.add_argument('config', help='plain model config (written by tools/fold.py)')
    parser.add_argument('checkpoint', help='folded checkpoint (written by tools/fold.py)')
    parser.add_argument('--work-dir', required=True, help='output directory')
    parser.add_argument('--deploy-cfg', help='mmdeploy deploy config (path or configs/deploy/ name)')
    parser.add_argument('--img', help='image used for tracing (default: first test image)')
    parser.add_argument('--compare', action='store_true', help='compare ORT with PyTorch outputs')
    parser.add_argument('--eval', action='store_true', help='evaluate PyTorch and ORT (test metric)')
    parser.add_argument('--max-map-diff', type=float, default=0.5,
                        help='with --eval: fail when |mAP(ORT) - mAP(torch)| exceeds this many points')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the model config, key=value pairs')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from mmdet.utils import register_all_modules

    from mmsparse.export import (build_ort_model, build_task_processor, export_onnx,
                                 first_test_image, verify_onnx)
    from mmsparse.export.evaluate import compare_graph_outputs, compare_models, evaluate_model, metric_deltas
    from mmsparse.export.fold import FOLD_META_KEY, PatternViolationError
    from mmsparse.utils import write_json
    register_all_modules()

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    img = args.img or first_test_image(cfg)
    result = export_onnx(cfg, args.checkpoint, args.work_dir, img, args.deploy_cfg)
    summary = dict(onnx_file=result.onnx_file, export_seconds=round(result.seconds, 2),
                   onnx_bytes=result.size_bytes)
    print(f'exported {result.onnx_file} ({result.size_bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s')

    ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    layers = (ckpt.get('meta') or {}).get(FOLD_META_KEY, {}).get('layers', {})
    patterns = {k: v['pattern'] for k, v in layers.items()}
    violations, missing = verify_onnx(result.onnx_file, patterns)
    from mmsparse.export.onnx import checkable_pattern
    checked = sum(checkable_pattern(p) for p in patterns.values()) - len(missing)
    print(f'ONNX pattern check: {checked} layers verified, {len(missing)} not found '
          f'{missing[:5] if missing else ""}')
    summary.update(onnx_layers_verified=checked, onnx_layers_missing=missing)
    status = 0
    if violations:
        print(str(PatternViolationError(violations)), file=sys.stderr)
        status = 1

    if args.compare or args.eval:
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
            ref = evaluate_model(torch_model, cfg)
            ort = evaluate_model(ort_model, cfg)
            deltas = metric_deltas(ref, ort)
            summary.update(metrics_torch=ref, metrics_onnx=ort, metric_deltas_points=deltas)
            print('PyTorch:', ref, '\nONNX Runtime:', ort)
            worst = max((abs(v) for k, v in deltas.items() if k.endswith('_mAP')), default=0.0)
            if worst > args.max_map_diff:
                print(f'mAP differs by {worst:.2f} points (> {args.max_map_diff})', file=sys.stderr)
                status = 1
    write_json(osp.join(args.work_dir, 'deploy_summary.json'), summary)
    return status


if __name__ == '__main__':
    sys.exit(main())
