"""``tools/deploy.py --runtime mmsparse``: the tiny folded Mask R-CNN packed in PyTorch and as the rewritten
ONNX graph, each evaluated beside the dense model in the same runtime; refusals before the export."""
import importlib.util
import json
import os.path as osp

import onnx
import pytest
import torch

from mmsparse.runtime import onnx as rt_onnx

from export_helpers import REPO

spec = importlib.util.spec_from_file_location('deploy_tool', osp.join(REPO, 'tools', 'deploy.py'))
deploy_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy_tool)

MAPS = ('coco/bbox_mAP', 'coco/segm_mAP')


def deploy(folded, work, *extra, checkpoint=None):
    return deploy_tool.main([folded.config, checkpoint or folded.checkpoint, '--work-dir', str(work),
                             '--runtime', 'mmsparse', *extra])


@pytest.mark.slow
def test_runtime_mmsparse_end_to_end(folded, tmp_path, capsys):
    """Forced sparse tactic: every eligible N:M layer runs on mmsparse's kernel in both runtimes; the
    mAPs equal the dense model's in the same runtime (within 0.2 points, the tool's default limit)."""
    assert deploy(folded, tmp_path, '--tactic', 'sparse', '--bench-rounds', '1') == 0
    out = capsys.readouterr().out
    summary = json.load(open(tmp_path / 'deploy_summary.json'))['runtime']
    metrics, deltas = summary['metrics'], summary['metric_deltas_points']
    assert set(metrics) == {'stock_mmdet', 'packed_pytorch', 'onnx_runtime', 'rewritten_onnx_runtime'}
    assert all(set(MAPS) <= set(m) for m in metrics.values())
    pairs = dict(packed_vs_stock_mmdet=('stock_mmdet', 'packed_pytorch'),
                 rewritten_vs_onnx_runtime=('onnx_runtime', 'rewritten_onnx_runtime'))
    for name, (ref, cand) in pairs.items():
        for key in MAPS:
            assert deltas[name][key] == pytest.approx(100 * (metrics[cand][key] - metrics[ref][key]))
            assert abs(deltas[name][key]) <= 0.2
    # 19 backbone convs at 1:16 (the stem is dense), 4 FPN convs at 2:4, 2 box-head fcs at 2:8
    assert summary['packed_layers'] == dict(sparse=25, dense=0)
    assert summary['onnx_nodes'] == dict(sparse=25, dense=0, plain=1) and not summary['onnx_layers_missing']
    assert set(summary['ms_per_batch']) == {'pytorch_dense', 'pytorch_packed', 'ort_dense', 'ort_rewritten'}
    rewritten = onnx.load(summary['sparse_onnx_file'])
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count(rt_onnx.CONV_OP) == 23 and ops.count(rt_onnx.LINEAR_OP) == 2
    assert rt_onnx.node_tactics(rewritten)['/backbone/layer1/layer1.0/conv1/Conv'] == 'sparse'
    assert 'rewritten bbox mAP' in out and 'packed bbox mAP' in out


@pytest.fixture
def plain_checkpoint(folded, tmp_path):
    """The folded weights without fold meta, layer1.0.conv1 made dense."""
    ckpt = torch.load(folded.checkpoint, weights_only=True)
    ckpt['state_dict']['backbone.layer1.0.conv1.weight'].add_(1.0)
    path = str(tmp_path / 'plain.pth')
    torch.save(dict(state_dict=ckpt['state_dict'], meta=dict(dataset_meta=ckpt['meta']['dataset_meta'])),
               path)
    return path


def test_refusals_before_export(folded, plain_checkpoint, tmp_path, capsys):
    work = tmp_path / 'work'
    assert deploy(folded, work, checkpoint=plain_checkpoint) == 2
    err = capsys.readouterr().err
    assert "has no 'mmsparse_fold' meta" in err and '--patterns' in err
    patterns = tmp_path / 'layers.json'
    patterns.write_text(json.dumps({'backbone.layer1.0.conv1': '1:16', 'backbone.layer1.0.conv2': '1:16'}))
    assert deploy(folded, work, '--patterns', str(patterns), checkpoint=plain_checkpoint) == 1
    err = capsys.readouterr().err
    assert 'backbone.layer1.0.conv1: block' in err and 'pattern 1:16 allows 1' in err
    assert 'layer1.0.conv2' not in err
    patterns.write_text(json.dumps({'backbone.conv1': 'dense'}))
    assert deploy(folded, work, '--patterns', str(patterns), checkpoint=plain_checkpoint) == 2
    assert 'no sparse layer declared' in capsys.readouterr().err
    assert not osp.exists(work / 'end2end.onnx')  # nothing exported
