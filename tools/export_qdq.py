"""Export a CGMQ detector to ONNX with QuantizeLinear/DequantizeLinear (mmdeploy), then check it.

    python tools/export_qdq.py CONFIG CHECKPOINT --work-dir DIR \\
        [--deploy-cfg instance-seg_onnxruntime_dynamic] [--opset 13] [--img IMG] [--compare]

CONFIG and CHECKPOINT are the CGMQ training config and checkpoint (not the folded ones: the QDQ
graph needs the activation ranges and gates). Steps: (1) mmdeploy's end-to-end export of the CGMQ
model in QDQ mode (:func:`mmsparse.export.qdq.export_qdq_detector`, opset >= 13, the per-layer bit
report in the ONNX metadata); (2) the Q/DQ pairs of the graph are counted per layer and checked
against the bit widths (one pair per weight of at most 8 bits, at least one per quantized input of
at most 8 bits, none for 16/32-bit tensors); (3) ``--compare`` runs ONNX Runtime on the test split
of the config: every Q/DQ pair against the CGMQ layer's fake quantization of the same values
(:func:`~mmsparse.export.qdq.qdq_parity`), then the detections against the fake-quant PyTorch model.
``--deploy-cfg`` takes a path or a name in ``configs/deploy/`` (its opset is raised to ``--opset``).
Exit status 1 when the Q/DQ pairs do not match the bit widths, or with ``--compare`` when more than
``--max-mismatch-rate`` of the quantized values differ from PyTorch by a code.
"""
import argparse
import os.path as osp
import sys

from mmengine.config import Config, DictAction


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Export a CGMQ detector to a QDQ ONNX (mmdeploy)')
    parser.add_argument('config', help='CGMQ config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='CGMQ checkpoint (not folded)')
    parser.add_argument('--work-dir', required=True, help='output directory')
    parser.add_argument('--deploy-cfg',
                        help='mmdeploy deploy config (path or configs/deploy/ name)')
    parser.add_argument('--opset', type=int, default=13, help='ONNX opset, at least 13')
    parser.add_argument('--img', help='image used for tracing (default: first test image)')
    parser.add_argument('--compare', action='store_true',
                        help='check every Q/DQ pair and the detections against PyTorch')
    parser.add_argument('--max-mismatch-rate', type=float, default=1e-5,
                        help='with --compare: fail when a larger share of the quantized values '
                        'differs from the fake-quant PyTorch layers by a code (rounding ties)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmdet.utils import register_all_modules

    import mmsparse  # noqa: F401  registers mmsparse's layers and its safe checkpoint loader
    from mmsparse.cgmq import bit_histogram
    from mmsparse.export import build_ort_model, build_task_processor, first_test_image
    from mmsparse.export.evaluate import compare_graph_outputs, compare_models
    from mmsparse.export.fold import build_model, load_source_checkpoint
    from mmsparse.export.qdq import check_qdq_graph, export_qdq_detector, qdq_parity_on_dataset
    from mmsparse.utils import write_json
    register_all_modules()

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    img = args.img or first_test_image(cfg)
    result = export_qdq_detector(cfg, args.checkpoint, args.work_dir, img, args.deploy_cfg,
                                 args.opset)
    print(f'exported {result.onnx_file} ({result.size_bytes / 2**20:.1f} MiB, opset {args.opset}) '
          f'in {result.seconds:.1f} s')
    summary = dict(onnx_file=result.onnx_file, export_seconds=round(result.seconds, 2),
                   onnx_bytes=result.size_bytes, opset=args.opset, bits=result.bits)

    model = build_model(cfg)
    load_source_checkpoint(model, args.checkpoint)
    print('bit widths:', bit_histogram(model))
    counts, problems = check_qdq_graph(result.onnx_file, model)
    pairs = {kind: sum(c[kind] for c in counts.values()) for kind in ('weight', 'act')}
    print(f'Q/DQ pairs: {pairs["weight"]} weight, {pairs["act"]} activation, '
          f'in {len(counts)} layers')
    summary.update(qdq_pairs=pairs, qdq_pairs_per_layer=counts, qdq_problems=problems)
    status = 0
    if problems:
        print('Q/DQ pairs do not match the bit widths:\n  ' + '\n  '.join(problems),
              file=sys.stderr)
        status = 1

    if args.compare:
        parity = qdq_parity_on_dataset(result.onnx_file, model, result.model_cfg)
        print(f'Q/DQ pairs vs the CGMQ layers on {parity["images"]} images: '
              f'{parity["mismatches"]}/{parity["numel"]} values a code apart, worst '
              f'{parity["act_max_diff_steps"]:.3g} step(s) (activations), '
              f'{parity["weight_max_diff_steps"]:.3g} (weights)')
        summary['qdq_parity'] = parity
        processor = build_task_processor(result.model_cfg, result.deploy_cfg)
        ort_model = build_ort_model(processor, result.onnx_file)
        diffs = compare_graph_outputs(model, ort_model, result.model_cfg, result.deploy_cfg)
        print('ONNX Runtime vs the exported computation in PyTorch (max abs diff):', diffs)
        stats = compare_models(model, ort_model, result.model_cfg)
        print('ONNX Runtime vs the fake-quant mmdet model:', stats.format())
        summary.update(graph_parity=diffs,
                       parity={k: v for k, v in vars(stats).items() if k != 'per_image'})
        if (parity['mismatch_rate'] > args.max_mismatch_rate
                or parity['weight_max_diff_steps'] > 1e-3):
            print(f'Q/DQ parity failed: mismatch rate {parity["mismatch_rate"]:.3g} '
                  f'(> {args.max_mismatch_rate}) or weights off by '
                  f'{parity["weight_max_diff_steps"]:.3g} step(s)', file=sys.stderr)
            status = 1
    write_json(osp.join(args.work_dir, 'qdq_summary.json'), summary)
    return status


if __name__ == '__main__':
    sys.exit(main())
