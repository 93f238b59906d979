"""tools/benchmark_infer.py --quick on a tiny dense detector and its MaxQ 1:16 folded version."""
import json
import math

import pytest
import torch
from helpers import run_tool, tiny_config

pytestmark = pytest.mark.slow

DENSE = 'configs/demo/dense_mask-rcnn_r18_fpn_demo.py'
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'


@pytest.fixture(scope='module')
def checkpoints(tiny_coco, tmp_path_factory):
    """(dense config, dense checkpoint, folded config, folded checkpoint) of the tiny demo model.

    The dense model is mmdet's initialisation with random batch-norm scales and statistics (the
    zero-initialised last BN of each residual block would make its conv all zeros once the ONNX
    exporter folds BN in, and identical all-zero initializers get merged); the MaxQ model loads it and
    takes its final 1:16 masks (preserve rate 0), then is folded by the real fold path.
    """
    from mmsparse.export import build_model, fold_checkpoint
    from mmsparse.maxq import NMSparseMixin
    work = tmp_path_factory.mktemp('bench_infer')
    dense_cfg = tiny_config(DENSE, tiny_coco, str(work / 'dense'))
    maxq_cfg = tiny_config(MAXQ, tiny_coco, str(work / 'maxq'))
    torch.manual_seed(0)
    dense = build_model(dense_cfg)
    dense.init_weights()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    dense_ckpt = str(work / 'dense.pth')
    torch.save(dict(state_dict=dense.state_dict()), dense_ckpt)
    sparse = build_model(maxq_cfg)
    sparse.load_state_dict(dense.state_dict(), strict=False)   # mask buffers: computed next
    for module in sparse.modules():
        if isinstance(module, NMSparseMixin):
            module.refresh_mask(0.0)
    sparse_ckpt = str(work / 'maxq.pth')
    torch.save(dict(state_dict=sparse.state_dict()), sparse_ckpt)
    folded = fold_checkpoint(maxq_cfg, sparse_ckpt, str(work / 'folded'), out_name='maxq')
    return dense_cfg, dense_ckpt, folded.config, folded.checkpoint


def resnet18_fpn_macs(h: int, w: int) -> tuple:
    """(all MACs, MACs with every backbone conv but the stem at 1/16) of the demo R18 + 64-ch FPN.

    Stem 7x7 3->64 at stride 2; stage i (stride 4·2^i, c = 64·2^i channels): a 3x3 conv from the
    previous width, three 3x3 c->c convs and (stages 2-4) a 1x1 downsample; FPN: a 1x1 lateral and a
    3x3 output conv to 64 channels per stage (the fifth level is a max-pool).
    """
    def positions(stride):
        return (h // stride) * (w // stride)
    stem = 64 * 3 * 7 * 7 * positions(2)
    backbone = fpn = 0
    for i, c in enumerate((64, 128, 256, 512)):
        stride, c_in = 4 * 2**i, 64 * 2**max(i - 1, 0)
        backbone += (c * c_in * 9 + 3 * c * c * 9 + (c * c_in if i else 0)) * positions(stride)
        fpn += (64 * c + 64 * 64 * 9) * positions(stride)
    return stem + backbone + fpn, stem + backbone / 16 + fpn


def test_quick_benchmark(checkpoints, tmp_path):
    from mmsparse.export import verify_checkpoint
    dense_cfg, dense_ckpt, folded_cfg, folded_ckpt = checkpoints
    run_tool('benchmark_infer.py', [dense_cfg, dense_ckpt, folded_cfg, folded_ckpt, '--quick',
                                    '--cfg-options', 'model.test_cfg.rcnn.max_per_img=7',
                                    '--out-dir', str(tmp_path)])
    report = json.loads((tmp_path / 'benchmark_infer.json').read_text())
    rows = report['results']
    assert [(r['runtime'], r['graph'], r['batch']) for r in rows] == [
        (runtime, graph, batch) for graph in ('backbone+neck', 'end2end')
        for runtime in ('pytorch', 'onnxruntime') for batch in (1, 8)]
    for r in rows:   # every case ran (batch 8 included for the end2end ONNX graph)
        assert 'error' not in r, r
        assert len(r['dense_times']) == len(r['folded_times']) == 3
        for key in ('dense_s', 'folded_s', 'ratio', 'dense_img_s', 'folded_img_s'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        q1, median, q3 = r['paired_ratio_quartiles']
        assert 0 < q1 <= median <= q3 < math.inf
        if r['graph'] == 'end2end':   # --cfg-options reached both models in both runtimes
            assert r['dense_dets_per_img'] == r['folded_dets_per_img'] == 7, r

    # the timed folded model really is 1:16 (19 backbone convs; the 3-channel stem stays dense)
    assert len(report['nm_layers']) == 19 and set(report['nm_layers'].values()) == {'1:16'}
    assert 'backbone.conv1' not in report['nm_layers']
    violations, _ = verify_checkpoint(folded_ckpt)
    assert violations == []
    assert all(v['verified'] == 19 for v in report['onnx_nm_verified'].values())

    # theoretical MAC ratio of backbone+neck = the hand-computed value at the benchmark input size
    _, _, h, w = report['input_shape']
    dense_macs, nm_macs = resnet18_fpn_macs(h, w)
    for r in rows:
        if r['graph'] == 'backbone+neck':
            assert r['gmac_per_img'] == pytest.approx(dense_macs / 1e9, rel=1e-9)
            assert r['theoretical_ratio'] == pytest.approx(nm_macs / dense_macs, rel=1e-9)
        else:   # the heads are dense: the whole detector saves less than backbone+neck
            assert nm_macs / dense_macs < r['theoretical_ratio'] < 1
    assert (tmp_path / 'benchmark_infer.png').stat().st_size > 0
    assert sorted(p.name for p in tmp_path.glob('*.onnx')) == [
        'dense_backbone_neck.onnx', 'dense_end2end.onnx', 'folded_backbone_neck.onnx',
        'folded_end2end.onnx']
