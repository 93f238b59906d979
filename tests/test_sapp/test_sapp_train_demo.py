"""The SA++ demo config end to end through tools/train.py on a tiny generated dataset."""
import json
import re

import pytest
import torch
from helpers import run_tool, tiny_config
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmsparse  # noqa: F401
from mmsparse.compat import safe_load_from_local
from mmsparse.core import BlockPattern, CompressedLayer, verify_state_dict
from mmsparse.export.compressed import load_compressed, storage_sizes

pytestmark = pytest.mark.slow
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'


HOOK = dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparsify=1, sparse=1, dense=1,
            cycles=2, interval=1)


@pytest.fixture(scope='module')
def demo_runs(tiny_coco, tmp_path_factory):
    """6 iterations: dense [0,1) sparsify [1,2) sparse [2,3) dense [3,4) sparsify [4,5) sparse [5,6),
    uninterrupted and resumed from iteration 3 (the start of the second DENSE phase)."""
    base = tmp_path_factory.mktemp('sapp_demo')
    cfg_path = tiny_config(SAPP, tiny_coco, str(base / 'wd'), max_iters=6, ckpt_interval=3,
                           custom_hooks=[HOOK], load_from=None)
    proc = run_tool('train.py', [cfg_path])
    resumed = tiny_config(SAPP, tiny_coco, str(base / 'resumed'), max_iters=6, ckpt_interval=3,
                          custom_hooks=[HOOK], load_from=None)
    run_tool('train.py', [resumed, '--resume', str(base / 'wd' / 'iter_3.pth')])
    return base, cfg_path, proc


def test_resume_of_the_detector_is_exact(demo_runs):
    base, _, _ = demo_runs
    full = safe_load_from_local(str(base / 'wd' / 'iter_6.pth'), 'cpu')['state_dict']
    resumed = safe_load_from_local(str(base / 'resumed' / 'iter_6.pth'), 'cpu')['state_dict']
    assert any(k.endswith('.support') for k in full)
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)


def test_sapp_demo_trains_reports_map_and_block_sparsity(demo_runs, tmp_path):
    base, cfg_path, proc = demo_runs
    tmp_path_wd = base / 'wd'
    out = proc.stdout + proc.stderr
    found = re.search(r'SequentialAttentionHook: final block sparsity ([0-9.]+) '
                      r'\((\d+)/(\d+) blocks of (\d+) layers', out)
    assert found and abs(float(found.group(1)) - 0.7) < 0.005 and found.group(4) == '18'
    logs = sorted(tmp_path_wd.glob('*/vis_data/scalars.json'))
    records = [json.loads(line) for line in logs[-1].read_text().splitlines()]
    assert [r['sapp_phase'] for r in records if 'sapp_phase' in r][-1] == 2
    metrics = [r for r in records if 'coco/bbox_mAP' in r]
    assert metrics and 0.0 <= metrics[-1]['coco/bbox_mAP'] <= 1.0

    # the checkpoint folds to exact zero blocks that the block verifier accepts, and a BSR copy
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(Config.fromfile(cfg_path).model)
    model.load_state_dict(safe_load_from_local(str(tmp_path_wd / 'iter_6.pth'), 'cpu')['state_dict'])
    compressed = [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
    folded = {f'{n}.weight': m.folded_weight() for n, m in compressed}
    specs = {n: m.fold_spec() for n, m in compressed}
    blocks = {n: s for n, s in specs.items() if isinstance(s.pattern, BlockPattern)}
    assert len(blocks) == 18 and all(s.pattern.min_sparsity > 0.69 for s in blocks.values())
    assert specs['backbone.conv1'].dense
    assert verify_state_dict(folded, specs) == []
    sizes = storage_sizes(folded, specs)
    assert sizes.layers_fp32 < 0.35 * sizes.layers_dense_fp32
    # tools/fold.py --compressed stores the block layers as BSR, read back bit-exactly
    proc = run_tool('fold.py', [cfg_path, str(tmp_path_wd / 'iter_6.pth'), '--out-dir',
                                str(tmp_path), '--name', 'sapp', '--compressed'])
    assert 'compressed layers only, packed fp32' in proc.stdout
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'sapp.safetensors'), framework='pt') as f:
        stored = set(f.keys())
    assert all(f'{n}.weight::crow_indices' in stored and f'{n}.weight' not in stored
               for n in blocks)
    back, _ = load_compressed(str(tmp_path / 'sapp.safetensors'))
    for key, value in folded.items():
        assert torch.equal(back[key], value.contiguous()), key
