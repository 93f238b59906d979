"""Inference cost of a folded (N:M, block-sparse or quantized) detector against its dense original.

Any checkpoint written by ``tools/fold.py`` works: MaxQ (N:M), SA++ / ACDC (block-sparse) and CGMQ
(quantized weights stored as floats on their bit grid). Both models run on the same fixed input
tensors: the first images of the dense config's test split, through its test pipeline and data
preprocessor, padded to one batch (images are repeated when the split is smaller than the largest
batch); batch 1 is the first image of that batch. Two graphs:

* ``backbone+neck``: ``model.extract_feat`` (every convolution the compressed layers live in, no
  data-dependent work);
* ``end2end``: the whole detector with its post-processing, PyTorch ``mode='predict'`` (mmdet's,
  masks pasted into the image) and the mmdeploy end-to-end ONNX graph (mmdeploy's rewritten heads
  and NMS, 28x28 mask logits); the work after the RPN depends on how many proposals and detections
  each model produces, so the detections per image are reported next to the timing.

Both ONNX graphs of both models are exported into ``--out-dir`` (``backbone+neck`` with
``torch.onnx.export``, ``end2end`` with mmdeploy and the same deploy config for both models) and run
in a plain ``onnxruntime.InferenceSession`` on the CPU provider. PyTorch runs in eval mode under
``torch.no_grad``. Torch and ONNX Runtime use ``--threads`` intra-op threads (default 1). Both
runtimes run every model, folded or not, as dense fp32 convolutions.

For every (runtime, graph, batch): warm-up, then ``--iters`` interleaved rounds (dense, folded;
folded, dense; ...), the median latency and images/s of each model, the ratio folded / dense of the
medians, and the quartiles of the per-round ratios (both models of a round saw similar machine load).
Next to it, the theoretical ratio a sparse kernel could reach: MACs of every conv / deconv / linear
layer of the folded model in that forward pass, with the layers its checkpoint declares sparse counted
at their density (N/M for an N:M layer; for a block layer, the share of its blocks that are not all
zero in the folded weights as loaded, which may exceed the declared minimum sparsity), over the same
pass counted dense. Quantized layers have no zero pattern: they count fully (ratio 1.0 for fp32
kernels; the fold meta holds their bits but no BOPs), and the plain folded model does not quantize
their inputs. The folded weights (as loaded into the timed model) are first checked against their
declared sparsity patterns and quantization grids, and the sparsity patterns again in both folded
ONNX graphs (the grids are not: the exporter folds batch norm into the convolutions, rescaling them).
``--cfg-options`` edits both model configs, e.g. ``model.test_cfg.rcnn.score_thr=0`` makes both
detectors keep ``max_per_img`` boxes, so the end2end work after the RPN is the same for both.
Writes ``benchmark_infer.json`` and ``benchmark_infer.png``.

    python tools/benchmark_infer.py configs/demo/dense_mask-rcnn_r18_fpn_demo.py \\
        work_dirs/demo/dense/iter_800.pth work_dirs/demo/folded/maxq_1-16.py \\
        work_dirs/demo/folded/maxq_1-16.pth --out-dir work_dirs/benchmarks/infer
"""
import argparse
import copy
import os
import os.path as osp
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnxruntime as ort
import torch
from mmengine.config import Config, DictAction
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException
from torch import Tensor, nn

import mmsparse  # noqa: F401  (registers the safe checkpoint loader used for training checkpoints)
from mmsparse.core import BlockPattern, FoldSpec, QuantGrid
from mmsparse.core.macs import MacCounter
from mmsparse.export import (PatternViolationError, build_model, checkpoint_specs,
                             load_plain_checkpoint, verify_folded)
from mmsparse.export.onnx import custom_op_domains, default_deploy_config, export_onnx, verify_onnx
from mmsparse.utils import atomic_write, write_json

TARGET = (0.95, 1.05)   # issue 7: folded inference within 0.95-1.05x dense
GRAPHS = ('backbone+neck', 'end2end')
RUNTIMES = ('pytorch', 'onnxruntime')
ORT_RUN_ERRORS = (Fail, InvalidArgument, RuntimeException)
Case = Tuple[Callable[[], Any], Optional[Callable[[], float]]]   # (timed call, detections per image)


def load_detector(config: Config, checkpoint: str) -> nn.Module:
    """Build the detector of ``config`` and load ``checkpoint`` strictly (a missing key is an error)."""
    from mmengine.runner import load_checkpoint
    model = build_model(config)
    load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval()


def fixed_batch(cfg: Config, model: nn.Module, size: int) -> Tuple[Tensor, list]:
    """``size`` test images through the test pipeline and ``model``'s preprocessor: (inputs, samples).

    The split is cycled when it has fewer than ``size`` images.
    """
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    data = pseudo_collate([dataset[i % len(dataset)] for i in range(size)])
    data = model.data_preprocessor(data, False)
    return data['inputs'], data['data_samples']


def fold_specs_of(checkpoint: str) -> Dict[str, FoldSpec]:
    """``{layer: FoldSpec}`` recorded in a folded checkpoint's meta (empty for a plain checkpoint)."""
    try:
        return dict(checkpoint_specs(load_plain_checkpoint(checkpoint), checkpoint))
    except ValueError:
        return {}


def sparse_layers(model: nn.Module, specs: Mapping[str, FoldSpec]) -> Dict[str, dict]:
    """``{layer: dict(pattern, density[, zero_block_share])}`` of the layers declared N:M or block.

    ``density`` is the share of the layer's MACs a sparse kernel computes (the pattern's
    ``density``): N/M for N:M, and for a block layer one minus ``zero_block_share``, its share of
    all-zero blocks in ``model``'s weight.
    """
    state = model.state_dict()
    out = {}
    for name, spec in specs.items():
        if spec.sparse:
            density = spec.pattern.density(state[f'{name}.weight'])
            out[name] = dict(pattern=str(spec.pattern), density=density)
            if isinstance(spec.pattern, BlockPattern):
                out[name]['zero_block_share'] = 1.0 - density
    return out


def describe(specs: Mapping[str, FoldSpec], sparse: Mapping[str, dict],
             quantized: Mapping[str, str], onnx_verified: Mapping[str, dict]) -> List[str]:
    """Lines saying what the folded checkpoint declares, what was verified and how MACs are counted."""
    lines = []
    nm = [v['pattern'] for v in sparse.values() if 'zero_block_share' not in v]
    blocks = [v for v in sparse.values() if 'zero_block_share' in v]
    if nm:
        lines.append(f'{len(nm)} N:M layers ({", ".join(sorted(set(nm)))}), counted at N/M of their MACs')
    if blocks:
        declared = [specs[name].pattern for name, v in sparse.items() if 'zero_block_share' in v]
        sizes = ', '.join(sorted({f'block{p.size}' for p in declared}))
        minimum = [p.min_sparsity or 0.0 for p in declared]
        shares = [v['zero_block_share'] for v in blocks]
        lines.append(f'{len(blocks)} block layers ({sizes}, declared zero-block share >= '
                     f'{min(minimum):.4f}-{max(minimum):.4f}), counted at 1 - their zero-block share '
                     f'in the loaded weights: {min(shares):.4f}-{max(shares):.4f}')
    if sparse:
        lines.append('sparsity patterns verified in the loaded weights and in the folded ONNX graphs ('
                     + ', '.join(f'{graph}: {v["verified"]}/{len(sparse)} layers found'
                                 for graph, v in onnx_verified.items()) + ')')
    if quantized:
        lines.append(f'{len(quantized)} quantized layers ({", ".join(sorted(set(quantized.values())))}): '
                     'weights verified on their declared grids in the loaded model (not in the ONNX '
                     'graphs); stored as fp32 with no zero pattern, so counted fully (theoretical '
                     'ratio 1.0 for fp32 kernels); activations are not quantized in either runtime; '
                     'the fold meta has per-layer bits but no BOPs, so no BOPs ratio is given')
    if not (sparse or quantized):
        lines.append('no sparse or quantized layer declared: every layer counted fully')
    lines.append('PyTorch and ONNX Runtime on the CPU run both models as dense fp32 convolutions; the '
                 'theoretical ratio is what a sparse kernel could reach at best')
    return lines


class FeatureGraph(nn.Module):
    """``detector.extract_feat`` as a module returning a tuple (the backbone+neck graph)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, inputs: Tensor) -> tuple:
        return tuple(self.detector.extract_feat(inputs))


def export_features(model: nn.Module, inputs: Tensor, path: str, opset: int) -> str:
    """Export backbone+neck to ONNX (dynamic batch and size; BN folded into the convs by the exporter)."""
    graph = FeatureGraph(model).eval()
    with torch.no_grad():
        outputs = [f'feat{i}' for i in range(len(graph(inputs)))]
    axes = {name: {0: 'batch', 2: f'h{i}', 3: f'w{i}'} for i, name in enumerate(outputs)}
    axes['input'] = {0: 'batch', 2: 'height', 3: 'width'}
    atomic_write(path, lambda tmp: torch.onnx.export(
        graph, (inputs, ), tmp, dynamo=False, opset_version=opset, input_names=['input'],
        output_names=outputs, dynamic_axes=axes, do_constant_folding=True))
    return path


def export_end2end(cfg: Config, checkpoint: str, path: str, image: str, deploy_cfg: str) -> str:
    """Export the whole detector with mmdeploy (:func:`~mmsparse.export.export_onnx`), atomically."""
    atomic_write(path, lambda tmp: export_onnx(cfg, checkpoint, osp.dirname(tmp), image, deploy_cfg,
                                               save_file=osp.basename(tmp)))
    return path


def ort_session(path: str, threads: int) -> ort.InferenceSession:
    """A stock ONNX Runtime CPU session with ``threads`` intra-op threads, sequential execution."""
    domains = custom_op_domains(path)
    if domains:
        raise RuntimeError(f'{path} uses custom op domains {domains}; this benchmark runs stock '
                           'onnxruntime sessions only')
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def measure(fns: Sequence[Callable[[], Any]], warmup: int, iters: int) -> List[List[float]]:
    """Wall times of ``iters`` interleaved rounds after ``warmup``; the order flips every round."""
    times: List[List[float]] = [[] for _ in fns]
    for round_idx in range(warmup + iters):
        order = range(len(fns)) if round_idx % 2 == 0 else reversed(range(len(fns)))
        for idx in order:
            start = time.perf_counter()
            fns[idx]()
            elapsed = time.perf_counter() - start
            if round_idx >= warmup:
                times[idx].append(elapsed)
    return times


def torch_case(model: nn.Module, graph: str, inputs: Tensor, samples: list) -> Case:
    """(timed call, detections per image or None) for a PyTorch model on one graph."""
    if graph == 'backbone+neck':
        return lambda: model.extract_feat(inputs), None
    samples = copy.deepcopy(samples)

    def predict():
        return model(inputs, samples, mode='predict')
    return predict, lambda: sum(len(s.pred_instances) for s in predict()) / len(inputs)


def ort_case(session: ort.InferenceSession, graph: str, inputs: np.ndarray) -> Case:
    """(timed call, detections per image or None) for an ONNX Runtime session (dets: score > 0)."""
    feed = {'input': inputs}

    def run():
        return session.run(None, feed)
    if graph == 'backbone+neck':
        return run, None
    return run, lambda: float((run()[0][..., 4] > 0).sum()) / len(inputs)


def plot(rows: List[dict], path: str) -> None:
    """Bar chart of folded / dense latency per case, with the theoretical MAC ratio as markers."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ok = [r for r in rows if r['ratio'] is not None]
    labels = [f'{r["runtime"]}\n{r["graph"]}\nbatch {r["batch"]}' for r in ok]
    fig, ax = plt.subplots(figsize=(1.3 * len(ok) + 2, 4))
    ax.axhspan(*TARGET, color='tab:green', alpha=0.15, label='target 0.95-1.05')
    ax.bar(labels, [r['ratio'] for r in ok], color='tab:blue', label='measured (folded / dense)')
    ax.plot(labels, [r['theoretical_ratio'] for r in ok], 'k_', markersize=30, mew=2,
            label='theoretical MAC ratio (sparse kernel)')
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel('folded ÷ dense')
    ax.set_title('inference latency of the folded model relative to dense (same run)')
    ax.legend(fontsize=7, loc='upper center', ncol=3)
    plt.xticks(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format='png'))
    plt.close(fig)


def _dets(row: dict) -> str:
    if row['dense_dets_per_img'] is None:
        return '—'
    return f'{row["dense_dets_per_img"]:.1f}, {row["folded_dets_per_img"]:.1f}'


def format_table(rows: List[dict]) -> str:
    """Markdown table of the rows (the form used in docs/benchmarks.md)."""
    lines = ['| runtime | graph | batch | dense ms | folded ms | folded ÷ dense | dense img/s | '
             'folded img/s | paired ratio IQR | GMAC/img | theoretical MAC ratio | '
             'dets/img dense, folded |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for r in rows:
        if r['ratio'] is None:
            lines.append(f'| {r["runtime"]} | {r["graph"]} | {r["batch"]} | not run: {r["error"]} |'
                         + ' |' * 8)
            continue
        q = r['paired_ratio_quartiles']
        lines.append(
            f'| {r["runtime"]} | {r["graph"]} | {r["batch"]} | {1e3 * r["dense_s"]:.1f} | '
            f'{1e3 * r["folded_s"]:.1f} | {r["ratio"]:.3f} | {r["dense_img_s"]:.1f} | '
            f'{r["folded_img_s"]:.1f} | {q[0]:.3f}–{q[2]:.3f} | {r["gmac_per_img"]:.3f} | '
            f'{r["theoretical_ratio"]:.3f} | '
            f'{_dets(r)} |')
    return '\n'.join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('dense_config', help='config of the dense model')
    parser.add_argument('dense_checkpoint', help='checkpoint of the dense model')
    parser.add_argument('folded_config', help='plain mmdet config written by tools/fold.py')
    parser.add_argument('folded_checkpoint', help='folded checkpoint written by tools/fold.py')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8], help='default 1 8')
    parser.add_argument('--iters', type=int, default=20, help='measured rounds per case')
    parser.add_argument('--warmup', type=int, default=3, help='warm-up rounds per case')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch and ONNX Runtime intra-op threads (default 1)')
    parser.add_argument('--deploy-cfg', help='mmdeploy deploy config for the end2end graphs '
                        '(default: the dynamic onnxruntime config for the task)')
    parser.add_argument('--out-dir', default='work_dirs/benchmarks/infer', help='output directory')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='overrides merged into both model configs, key=value pairs (e.g. '
                        'model.test_cfg.rcnn.score_thr=0: both detectors keep max_per_img boxes)')
    parser.add_argument('--quick', action='store_true', help='1 warm-up + 3 rounds (smoke test)')
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 1, 3
    if args.iters < 2:
        parser.error('--iters must be at least 2 (quartiles of the paired ratios)')
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start = time.perf_counter()

    dense_cfg = Config.fromfile(args.dense_config)
    folded_cfg = Config.fromfile(args.folded_config)
    if args.cfg_options:
        dense_cfg.merge_from_dict(args.cfg_options)
        folded_cfg.merge_from_dict(args.cfg_options)
    dense = load_detector(dense_cfg, args.dense_checkpoint)
    folded = load_detector(folded_cfg, args.folded_checkpoint)
    specs = fold_specs_of(args.folded_checkpoint)
    verify_folded(folded.state_dict(), specs)
    sparse = sparse_layers(folded, specs)
    density = {name: v['density'] for name, v in sparse.items()}
    quantized = {name: str(s.pattern) for name, s in specs.items()
                 if isinstance(s.pattern, QuantGrid)}

    largest = max(args.batch_sizes)
    inputs, samples = fixed_batch(dense_cfg, dense, largest)

    deploy_cfg = args.deploy_cfg or default_deploy_config(folded_cfg)
    opset = Config.fromfile(deploy_cfg).onnx_config.opset_version
    image = samples[0].metainfo['img_path']   # traced by mmdeploy's export
    onnx_files: Dict[str, Dict[str, str]] = {}
    for name, model, cfg, ckpt in (('dense', dense, dense_cfg, args.dense_checkpoint),
                                   ('folded', folded, folded_cfg, args.folded_checkpoint)):
        onnx_files[name] = {
            'backbone+neck': export_features(model, inputs[:1],
                                             osp.join(args.out_dir, f'{name}_backbone_neck.onnx'), opset),
            'end2end': export_end2end(cfg, ckpt, osp.join(args.out_dir, f'{name}_end2end.onnx'),
                                      image, deploy_cfg)}
    onnx_verified = {}
    for graph, path in onnx_files['folded'].items():
        violations, missing = verify_onnx(path, specs)
        if violations:
            raise PatternViolationError(violations)
        onnx_verified[graph] = dict(verified=len(sparse) - len(missing), missing=missing)
    sessions = {name: {g: ort_session(p, args.threads) for g, p in files.items()}
                for name, files in onnx_files.items()}

    rows = []
    for graph in GRAPHS:
        for runtime in RUNTIMES:
            for batch in args.batch_sizes:
                x, data_samples = inputs[:batch].contiguous(), samples[:batch]
                row = dict(runtime=runtime, graph=graph, batch=batch, ratio=None)
                if runtime == 'pytorch':
                    cases = [torch_case(m, graph, x, data_samples) for m in (dense, folded)]
                else:
                    cases = [ort_case(sessions[n][graph], graph, x.numpy()) for n in ('dense', 'folded')]
                with torch.no_grad():
                    try:
                        dets = [count() if count else None for _, count in cases]
                    except ORT_RUN_ERRORS as err:   # e.g. a graph that does not take this batch
                        row['error'] = str(err).splitlines()[0][:200]
                        rows.append(row)
                        continue
                    with MacCounter(folded) as macs:
                        (folded.extract_feat(x) if graph == 'backbone+neck'
                         else folded(x, copy.deepcopy(data_samples), mode='predict'))
                    times = measure([fn for fn, _ in cases], args.warmup, args.iters)
                dense_s, folded_s = (statistics.median(t) for t in times)
                paired = [f / d for d, f in zip(*times)]   # same round, similar machine load
                row.update(dense_s=dense_s, folded_s=folded_s, ratio=folded_s / dense_s,
                           paired_ratio_quartiles=statistics.quantiles(paired, n=4),
                           dense_img_s=batch / dense_s, folded_img_s=batch / folded_s,
                           dense_times=times[0], folded_times=times[1],
                           gmac_per_img=macs.total / batch / 1e9,
                           sparse_gmac_per_img=macs.weighted(density) / batch / 1e9,
                           theoretical_ratio=macs.weighted(density) / macs.total,
                           dense_dets_per_img=dets[0], folded_dets_per_img=dets[1],
                           within_target=TARGET[0] <= folded_s / dense_s <= TARGET[1])
                rows.append(row)

    table = format_table(rows)
    notes = describe(specs, sparse, quantized, onnx_verified)
    print('\n'.join(notes + ['', table]))
    report = dict(
        dense_config=args.dense_config, dense_checkpoint=args.dense_checkpoint,
        folded_config=args.folded_config, folded_checkpoint=args.folded_checkpoint,
        deploy_config=deploy_cfg, onnx_files=onnx_files, input_shape=list(inputs.shape),
        sparse_layers=sparse, onnx_verified=onnx_verified,
        quantized_layers=quantized, notes=notes,
        cfg_options=args.cfg_options, iters=args.iters, warmup=args.warmup, threads=args.threads,
        target=TARGET,
        cpu_count=os.cpu_count(), machine=platform.machine(), torch=torch.__version__,
        onnxruntime=ort.__version__, load_avg_start=load_start, load_avg_end=os.getloadavg(),
        wall_s=time.perf_counter() - start, results=rows, table=table)
    write_json(osp.join(args.out_dir, 'benchmark_infer.json'), report)
    plot(rows, osp.join(args.out_dir, 'benchmark_infer.png'))
    print(f'load average {load_start[0]:.2f} → {report["load_avg_end"][0]:.2f} (1 min), '
          f'{report["wall_s"]:.0f} s; wrote {args.out_dir}/benchmark_infer.json and .png')


if __name__ == '__main__':
    main()
