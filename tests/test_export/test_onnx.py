import json
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmsparse  # noqa: F401
from mmsparse.export import (build_ort_model, build_task_processor, export_onnx, mmdeploy_compat,
                             verify_onnx)
from mmsparse.export.evaluate import compare_graph_outputs, compare_models, evaluate_model, metric_deltas
from mmsparse.export.onnx import _node_module, custom_op_domains, onnx_layer_weights

from export_helpers import REPO


def test_mmdeploy_compat_is_scoped():
    import torch.onnx.symbolic_opset9 as opset9
    export = torch.onnx.export
    assert not hasattr(opset9, '_cast_Long')
    with mmdeploy_compat():
        assert torch.onnx.export is not export and torch.onnx.export.__wrapped__ is export
        assert callable(opset9._cast_Long)
    assert torch.onnx.export is export and not hasattr(opset9, '_cast_Long')
    with pytest.raises(RuntimeError):
        with mmdeploy_compat():
            raise RuntimeError
    assert torch.onnx.export is export and not hasattr(opset9, '_cast_Long')


def test_node_module_names():
    assert _node_module('/backbone/layer1/layer1.0/conv1/Conv') == 'backbone.layer1.0.conv1'
    assert _node_module('/backbone/layer2/layer2.0/downsample/downsample.0/Conv') == \
        'backbone.layer2.0.downsample.0'
    assert _node_module('/rpn_head/rpn_cls_1/Conv') == 'rpn_head.rpn_cls'


@pytest.fixture(scope='module')
def exported(folded, val_images, tmp_path_factory):
    work = str(tmp_path_factory.mktemp('onnx'))
    return export_onnx(folded.config, folded.checkpoint, work, val_images[0])


@pytest.mark.slow
def test_onnx_export_patterns_and_ort_parity(folded, exported, tmp_path):
    assert osp.getsize(exported.onnx_file) == exported.size_bytes > 0
    print(f'\nexport {exported.seconds:.1f} s, {exported.size_bytes / 2**20:.1f} MiB')
    assert custom_op_domains(exported.onnx_file) == []  # standard RoiAlign / NonMaxSuppression
    patterns = folded.specs
    violations, missing = verify_onnx(exported.onnx_file, patterns)
    assert violations == [] and missing == []
    weights = onnx_layer_weights(exported.onnx_file, list(patterns))
    # BN-folded backbone convs keep exact zeros: 15 of 16 in every block
    w = weights['backbone.layer2.0.conv1'][0]
    assert (w == 0).mean() == pytest.approx(15 / 16)
    assert weights['roi_head.bbox_head.shared_fcs.0'][0].shape == (256, 64 * 7 * 7)

    cfg = Config.fromfile(folded.config)
    processor = build_task_processor(cfg)
    ort_model = build_ort_model(processor, exported.onnx_file)
    torch_model = processor.build_pytorch_model(folded.checkpoint)
    # the exported graph: ORT == the same (mmdeploy-rewritten) computation in PyTorch
    diffs = compare_graph_outputs(torch_model, ort_model, cfg, processor.deploy_cfg)
    print('ORT vs rewritten torch:', diffs)
    assert diffs['images'] == 3 and diffs['shape_mismatch'] == 0
    assert diffs['dets'] < 1e-3 and diffs['labels'] == 0 and diffs['masks'] < 1e-4
    # end to end against stock mmdet (mmdeploy's RPN NMS runs across levels: close, not equal)
    stats = compare_models(torch_model, ort_model, cfg)
    print('ORT vs stock mmdet:', stats.format())
    assert stats.images == 3

    ref, ort = evaluate_model(torch_model, cfg), evaluate_model(ort_model, cfg)
    deltas = metric_deltas(ref, ort)
    print('mAP torch', ref, 'ort', ort)
    assert abs(deltas['coco/bbox_mAP']) <= 0.5 and abs(deltas['coco/segm_mAP']) <= 0.5


@pytest.mark.slow
def test_onnx_verify_refuses_tampered_graph(folded, exported, tmp_path):
    import onnx
    from onnx import numpy_helper
    model = onnx.load(exported.onnx_file)
    name = 'neck.fpn_convs.1.conv.weight'  # 2:4, kept its name in the graph
    init = next(i for i in model.graph.initializer if i.name == name)
    array = numpy_helper.to_array(init).copy()
    block = array[0, 0:4, 0, 0]
    array[0, int(np.flatnonzero(block == 0)[0]), 0, 0] = 1.0
    init.CopyFrom(numpy_helper.from_array(array, name))
    bad = str(tmp_path / 'bad.onnx')
    onnx.save(model, bad)
    patterns = folded.specs
    violations, _ = verify_onnx(bad, patterns)
    assert [(v.layer, v.block) for v in violations] == [('neck.fpn_convs.1.conv', (0, 0, 0, 0))]


@pytest.mark.slow
def test_deploy_cli(folded, tmp_path):
    res = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'deploy.py'), folded.config,
                          folded.checkpoint, '--work-dir', str(tmp_path), '--compare'],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.load(open(tmp_path / 'deploy_summary.json'))
    assert summary['onnx_layers_missing'] == [] and summary['onnx_layers_verified'] > 20
    assert summary['graph_parity']['shape_mismatch'] == 0 and summary['graph_parity']['dets'] < 1e-3
    assert 'ONNX Runtime vs stock mmdet' in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['faster-rcnn', 'retinanet'])
def test_other_detectors_export(kind, demo_data, val_images, tmp_path):
    from export_helpers import sparse_detector_config
    from mmsparse.export import build_model, fold_checkpoint
    from mmsparse.maxq import NMSparseMixin
    cfg = sparse_detector_config(kind, demo_data)
    cfg_path = str(tmp_path / f'{kind}.py')
    cfg.dump(cfg_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # zero_init_residual would zero whole convs
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, NMSparseMixin):
            m.refresh_mask(0.0)
    ckpt = str(tmp_path / 'sparse.pth')
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    folded = fold_checkpoint(cfg_path, ckpt, str(tmp_path))
    exported = export_onnx(folded.config, folded.checkpoint, str(tmp_path), val_images[0])
    patterns = folded.specs
    violations, missing = verify_onnx(exported.onnx_file, patterns)
    assert violations == [] and missing == []
    plain = Config.fromfile(folded.config)
    processor = build_task_processor(plain)
    assert 'detection' in processor.deploy_cfg.filename
    ort_model = build_ort_model(processor, exported.onnx_file)
    torch_model = processor.build_pytorch_model(folded.checkpoint)
    diffs = compare_graph_outputs(torch_model, ort_model, plain, processor.deploy_cfg)
    print(f'\n{kind}: export {exported.seconds:.1f} s, {exported.size_bytes / 2**20:.1f} MiB, {diffs}')
    assert diffs['shape_mismatch'] == 0 and diffs['dets'] < 1e-3 and diffs['labels'] == 0
