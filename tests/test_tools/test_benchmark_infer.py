"""tools/benchmark_infer.py --quick on a tiny dense detector and its folded MaxQ 1:16 and SA++ versions."""
import json
import math

import pytest
import torch
from helpers import run_tool, tiny_config

pytestmark = pytest.mark.slow

DENSE = 'configs/demo/dense_mask-rcnn_r18_fpn_demo.py'
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'
EXTRA_ZERO_BLOCK = 'backbone.layer1.0.conv1'


@pytest.fixture(scope='module')
def dense(tiny_coco, tmp_path_factory):
    """(work dir, dense config, dense model, dense checkpoint) of the tiny demo model.

    The dense model is mmdet's initialisation with random batch-norm scales and statistics (the
    zero-initialised last BN of each residual block would make its conv all zeros once the ONNX
    exporter folds BN in, and identical all-zero initializers get merged).
    """
    from mmsparse.export import build_model
    work = tmp_path_factory.mktemp('bench_infer')
    dense_cfg = tiny_config(DENSE, tiny_coco, str(work / 'dense'))
    torch.manual_seed(0)
    model = build_model(dense_cfg)
    model.init_weights()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    dense_ckpt = str(work / 'dense.pth')
    torch.save(dict(state_dict=model.state_dict()), dense_ckpt)
    return work, dense_cfg, model, dense_ckpt


def fold_from_dense(dense, base: str, name: str, tiny_coco, edit) -> tuple:
    """Build ``base`` on tiny data, load the dense weights, ``edit`` it and fold it by the real path.

    Returns:
        tuple: (dense config, dense checkpoint, folded config, folded checkpoint).
    """
    from mmsparse.export import build_model, fold_checkpoint
    work, dense_cfg, dense_model, dense_ckpt = dense
    cfg = tiny_config(base, tiny_coco, str(work / name))
    model = build_model(cfg)
    model.load_state_dict(dense_model.state_dict(), strict=False)   # method state: set by edit
    edit(model)
    ckpt = str(work / f'{name}.pth')
    torch.save(dict(state_dict=model.state_dict()), ckpt)
    folded = fold_checkpoint(cfg, ckpt, str(work / 'folded'), out_name=name)
    return dense_cfg, dense_ckpt, folded.config, folded.checkpoint


@pytest.fixture(scope='module')
def maxq_checkpoints(dense, tiny_coco):
    """The MaxQ model takes its final 1:16 masks (preserve rate 0)."""
    from mmsparse.maxq import NMSparseMixin

    def edit(model):
        for module in model.modules():
            if isinstance(module, NMSparseMixin):
                module.refresh_mask(0.0)
    return fold_from_dense(dense, MAXQ, 'maxq', tiny_coco, edit)


@pytest.fixture(scope='module')
def sapp_checkpoints(dense, tiny_coco):
    """The SA++ model prunes 3/4 of the 16x16 blocks of its block layers by random attention logits.

    One more (kept) block of ``backbone.layer1.0.conv1`` is zeroed in the weight, so its folded
    weight has one all-zero block more than its declared pattern requires.
    """
    from mmsparse.core import expand_block_mask
    from mmsparse.sapp.layers import BlockSparseMixin

    def edit(model):
        torch.manual_seed(1)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, BlockSparseMixin) and module.is_sparse:
                    module.block_logits.normal_()
                    module.prune_to(3 * module.n_blocks // 4)
                    if name == EXTRA_ZERO_BLOCK:
                        extra = torch.zeros_like(module.support)
                        extra.view(-1)[int(torch.nonzero(module.support.view(-1))[0])] = 1
                        module.weight[expand_block_mask(extra.bool(), module.weight.shape, 16)] = 0
    return fold_from_dense(dense, SAPP, 'sapp', tiny_coco, edit)


def resnet18_fpn_macs(h: int, w: int) -> dict:
    """MACs of the demo R18 + 64-ch FPN at input ``h`` x ``w``, by part.

    Stem 7x7 3->64 at stride 2; stage i (stride 4·2^i, c = 64·2^i channels): a 3x3 conv from the
    previous width, three 3x3 c->c convs and (stages 2-4) a 1x1 downsample; FPN: a 1x1 lateral and a
    3x3 output conv to 64 channels per stage (the fifth level is a max-pool). ``conv3x3`` and
    ``downsample`` are the residual stages' convs; ``block16`` is the MACs of one 16x16 block of a
    stage-1 conv (16 outputs x 16 products at each of its positions).
    """
    def positions(stride):
        return (h // stride) * (w // stride)
    macs = dict(stem=64 * 3 * 7 * 7 * positions(2), conv3x3=0, downsample=0, fpn=0,
                block16=16 * 16 * positions(4))
    for i, c in enumerate((64, 128, 256, 512)):
        stride, c_in = 4 * 2**i, 64 * 2**max(i - 1, 0)
        macs['conv3x3'] += (c * c_in * 9 + 3 * c * c * 9) * positions(stride)
        macs['downsample'] += (c * c_in if i else 0) * positions(stride)
        macs['fpn'] += (64 * c + 64 * 64 * 9) * positions(stride)
    return macs


def run_quick(checkpoints, out_dir) -> dict:
    """Run the tool in --quick mode, check that every case ran; return its JSON report."""
    run_tool('benchmark_infer.py', [*checkpoints, '--quick', '--cfg-options',
                                    'model.test_cfg.rcnn.max_per_img=7', '--out-dir', str(out_dir)])
    report = json.loads((out_dir / 'benchmark_infer.json').read_text())
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
    assert (out_dir / 'benchmark_infer.png').stat().st_size > 0
    assert sorted(p.name for p in out_dir.glob('*.onnx')) == [
        'dense_backbone_neck.onnx', 'dense_end2end.onnx', 'folded_backbone_neck.onnx',
        'folded_end2end.onnx']
    return report


def check_theoretical(report: dict, sparse_macs: float, dense_macs: float) -> None:
    """backbone+neck's theoretical ratio is the hand-computed one; end2end saves less (dense heads)."""
    for r in report['results']:
        if r['graph'] == 'backbone+neck':
            assert r['gmac_per_img'] == pytest.approx(dense_macs / 1e9, rel=1e-9)
            assert r['theoretical_ratio'] == pytest.approx(sparse_macs / dense_macs, rel=1e-9)
        else:
            assert sparse_macs / dense_macs < r['theoretical_ratio'] < 1


def test_quick_benchmark(maxq_checkpoints, tmp_path):
    from mmsparse.export import verify_checkpoint
    report = run_quick(maxq_checkpoints, tmp_path)
    # the timed folded model really is 1:16 (19 backbone convs; the 3-channel stem stays dense)
    layers = report['sparse_layers']
    assert len(layers) == 19 and {v['pattern'] for v in layers.values()} == {'1:16'}
    assert 'backbone.conv1' not in layers
    violations, _ = verify_checkpoint(maxq_checkpoints[3])
    assert violations == []
    assert all(v['verified'] == 19 for v in report['onnx_verified'].values())
    assert report['quantized_layers'] == {}

    _, _, h, w = report['input_shape']
    m = resnet18_fpn_macs(h, w)
    dense_macs = m['stem'] + m['conv3x3'] + m['downsample'] + m['fpn']
    check_theoretical(report, m['stem'] + (m['conv3x3'] + m['downsample']) / 16 + m['fpn'], dense_macs)


def test_quick_benchmark_block_sparse(sapp_checkpoints, tmp_path):
    from mmsparse.core import BlockPattern
    report = run_quick(sapp_checkpoints, tmp_path)
    # 16x16 blocks of >= 100 per layer: the 16 3x3 convs of the residual stages (stem: 147 columns;
    # 1x1 downsamples: 32, 128 and 512 blocks, so the last two are block-sparse too)
    layers = report['sparse_layers']
    assert sorted(layers) == sorted(
        [f'backbone.layer{s}.{b}.conv{c}' for s in range(1, 5) for b in (0, 1) for c in (1, 2)]
        + ['backbone.layer3.0.downsample.0', 'backbone.layer4.0.downsample.0'])
    for name, v in layers.items():   # declared 3/4; measured on the loaded weights
        assert BlockPattern.parse(v['pattern']) == BlockPattern(16, 0.75), v
        extra = 1 / 144 if name == EXTRA_ZERO_BLOCK else 0   # 4 x 36 blocks
        assert v['zero_block_share'] == pytest.approx(0.75 + extra, abs=1e-12)
        assert v['density'] == pytest.approx(1 - v['zero_block_share'], abs=1e-12)
    assert all(v['verified'] == 18 and v['missing'] == [] for v in report['onnx_verified'].values())
    assert report['quantized_layers'] == {}

    _, _, h, w = report['input_shape']
    m = resnet18_fpn_macs(h, w)
    dense_macs = m['stem'] + m['conv3x3'] + m['downsample'] + m['fpn']
    down_34 = (256 * 128 * (h // 16) * (w // 16) + 512 * 256 * (h // 32) * (w // 32))
    sparse_macs = (m['stem'] + m['conv3x3'] / 4 + m['downsample'] - 3 / 4 * down_34 + m['fpn']
                   - m['block16'])
    check_theoretical(report, sparse_macs, dense_macs)
    assert all(r['theoretical_ratio'] < 1 for r in report['results'])
