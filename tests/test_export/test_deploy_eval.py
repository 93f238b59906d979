"""``tools/deploy.py --eval``: stock mmdet, the exported graph in PyTorch and ONNX Runtime on the tiny
folded Mask R-CNN; the pass/fail check is ONNX Runtime against the exported graph."""
import importlib.util
import json
import os.path as osp
import subprocess
import sys

import pytest
from mmengine.config import Config

import mmsparse  # noqa: F401
from mmsparse.export import build_ort_model, build_task_processor, export_onnx
from mmsparse.export.evaluate import (TorchGraphWrapper, compare_models, evaluate_model,
                                      exported_graph_model, format_deltas, format_maps,
                                      largest_map_delta, metric_deltas)

from export_helpers import REPO

spec = importlib.util.spec_from_file_location('deploy_tool', osp.join(REPO, 'tools', 'deploy.py'))
deploy_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy_tool)

MAPS = ('coco/bbox_mAP', 'coco/segm_mAP')


def test_limit_error_names_both_maps_option_and_docs():
    graph = {'coco/bbox_mAP': 0.270, 'coco/segm_mAP': 0.282, 'coco/bbox_mAP_50': 0.5}
    ort = {'coco/bbox_mAP': 0.261, 'coco/segm_mAP': 0.277, 'coco/bbox_mAP_50': 0.4}
    deltas = metric_deltas(graph, ort)
    assert largest_map_delta(deltas) == ('coco/bbox_mAP', pytest.approx(-0.9))  # _50 is no headline
    assert format_maps(ort) == 'bbox mAP 0.261, segm mAP 0.277'
    assert format_deltas(deltas) == 'bbox -0.90, segm -0.50 points'
    args = ('ONNX Runtime', ort, 'exported graph in PyTorch', graph, deltas, '--max-map-diff')
    message = deploy_tool.limit_error(*args, 0.5, 'export/runtime error')
    assert 'ONNX Runtime 0.261 vs exported graph in PyTorch 0.270' in message
    assert 'differ by 0.90 points, more than --max-map-diff 0.5' in message
    assert 'docs/deployment.md' in message
    assert deploy_tool.limit_error(*args, 0.95, '') is None
    assert deploy_tool.limit_error(*args, None, '') is None  # no limit: report only


@pytest.fixture(scope='module')
def models(folded, val_images, tmp_path_factory):
    """``(cfg, stock mmdet model, exported graph model, ORT model)`` of the tiny folded model."""
    work = str(tmp_path_factory.mktemp('onnx_eval'))
    exported = export_onnx(folded.config, folded.checkpoint, work, val_images[0])
    cfg = Config.fromfile(folded.config)
    processor = build_task_processor(cfg)
    ort_model = build_ort_model(processor, exported.onnx_file)
    torch_model = processor.build_pytorch_model(folded.checkpoint)
    graph_model = exported_graph_model(ort_model, torch_model, processor.deploy_cfg)
    return cfg, torch_model, graph_model, ort_model


@pytest.mark.slow
def test_exported_graph_model_evaluates_like_ort(models):
    cfg, torch_model, graph_model, ort_model = models
    assert isinstance(graph_model.wrapper, TorchGraphWrapper)
    assert not isinstance(ort_model.wrapper, TorchGraphWrapper)  # the ORT model keeps its session
    assert graph_model.data_preprocessor is ort_model.data_preprocessor
    # after the shared mmdeploy post-processing: the same detections, boxes, labels and masks
    # (stock mmdet differs from ORT here by up to 80 px and 5 labels: mmdeploy's NMS deviation)
    stats = compare_models(graph_model, ort_model, cfg)
    print('\nexported graph in PyTorch vs ORT:', stats.format())
    assert stats.images == 3 and stats.count_mismatch == 0 and stats.detections > 0
    assert stats.max_bbox_diff < 1e-3 and stats.max_score_diff < 1e-4 and stats.label_mismatch == 0
    assert stats.mask_pixel_mismatch <= 1e-4 * stats.mask_pixels
    stock, graph, ort = (evaluate_model(m, cfg) for m in (torch_model, graph_model, ort_model))
    print('mAP stock', format_maps(stock), '| exported graph', format_maps(graph), '| ORT',
          format_maps(ort))
    deltas = metric_deltas(graph, ort)
    assert set(MAPS) <= set(deltas) and all(abs(deltas[k]) <= 0.1 for k in MAPS)


@pytest.mark.slow
def test_deploy_eval_cli(folded, tmp_path):
    """Default limit: exit 0 and a summary with the three metric sets and both deltas; impossible
    limits: exit 1, stderr names the options and the docs."""
    tool = [sys.executable, osp.join(REPO, 'tools', 'deploy.py'), folded.config, folded.checkpoint,
            '--eval']
    ok = subprocess.run(tool + ['--work-dir', str(tmp_path / 'ok')], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    summary = json.load(open(tmp_path / 'ok' / 'deploy_summary.json'))
    metrics, deltas = summary['metrics'], summary['metric_deltas_points']
    assert set(metrics) == {'stock_mmdet', 'exported_graph', 'onnx_runtime'}
    assert all(set(MAPS) <= set(m) for m in metrics.values())
    for name, (ref, cand) in dict(onnx_runtime_vs_exported_graph=('exported_graph', 'onnx_runtime'),
                                  exported_graph_vs_stock_mmdet=('stock_mmdet', 'exported_graph')).items():
        assert deltas[name] == pytest.approx(metric_deltas(metrics[ref], metrics[cand]))
    assert all(abs(deltas['onnx_runtime_vs_exported_graph'][k]) <= 0.1 for k in MAPS)
    assert summary['limits_points'] == dict(max_map_diff=0.5, max_mmdeploy_gap=None)
    assert 'exported graph in PyTorch:' in ok.stdout and 'not an export error' in ok.stdout

    bad = subprocess.run(tool + ['--work-dir', str(tmp_path / 'bad'), '--max-map-diff', '-1',
                                 '--max-mmdeploy-gap', '-1'], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if 'points, more than' in line]
    assert len(errors) == 2
    assert 'ONNX Runtime' in errors[0] and '--max-map-diff -1' in errors[0]
    assert 'stock mmdet' in errors[1] and '--max-mmdeploy-gap -1' in errors[1]
    assert all('docs/deployment.md' in e for e in errors)
    assert json.load(open(tmp_path / 'bad' / 'deploy_summary.json'))['metrics'].keys() == metrics.keys()
