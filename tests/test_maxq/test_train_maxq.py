"""MaxQ through tools/train.py on a tiny detector: schedule, final N:M masks, frozen stages, resume."""
import json

import pytest
import torch
from helpers import run_tool, tiny_config

from mmsparse.compat import safe_load_from_local
from mmsparse.core import NMPattern

pytestmark = pytest.mark.slow
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'


def _cfg(tiny_coco, work_dir, **updates):
    updates = {'load_from': None, 'model.backbone.frozen_stages': 1,
               'custom_hooks': [dict(type='MaxQHook', schedule='cubic', start=0, end=3,
                                     interval=1)], **updates}
    return tiny_config(MAXQ, tiny_coco, work_dir, **updates)


@pytest.fixture(scope='module')
def maxq_runs(tiny_coco, tmp_path_factory):
    base = tmp_path_factory.mktemp('maxq')
    full = run_tool('train.py', [_cfg(tiny_coco, str(base / 'full'))])
    resumed = run_tool('train.py', [_cfg(tiny_coco, str(base / 'resumed')), '--resume',
                                    str(base / 'full' / 'iter_2.pth')])
    return base, full, resumed


def _state(path):
    return safe_load_from_local(str(path), 'cpu')['state_dict']


def test_final_masks_are_exact_nm_and_stem_dense(maxq_runs):
    base, full, _ = maxq_runs
    state = _state(base / 'full' / 'iter_4.pth')
    masks = {k[:-len('.mask')]: v for k, v in state.items() if k.endswith('.mask')}
    assert 'backbone.conv1' in masks and torch.equal(masks['backbone.conv1'],
                                                     torch.ones_like(masks['backbone.conv1']))
    sparse = [name for name in masks if name != 'backbone.conv1']
    assert len(sparse) == 19  # 16 block convs + 3 downsample convs of ResNet-18
    for name in sparse:
        folded = state[f'{name}.weight'] * masks[name]
        assert NMPattern(1, 16).violations(name, folded) == [], name
        assert ((masks[name] == 0) | (masks[name] >= 1)).all()
    log = full.stdout + full.stderr
    assert 'final masks fixed at preserve rate 0' in log
    assert 'dense: the 3-channel stem is dense by rule' in log


def test_schedule_and_sparsity_logged(maxq_runs):
    base, _, _ = maxq_runs
    scalars = sorted((base / 'full').glob('*/vis_data/scalars.json'))[-1]
    rows = [json.loads(line) for line in scalars.read_text().splitlines()]
    rates = [r['nm_preserve_rate'] for r in rows if 'nm_preserve_rate' in r]
    # after iterations 1, 2, 3: p(1) = (2/3)^3, p(2) = (1/3)^3, p(3) = 0, and 0 after the last
    assert rates == pytest.approx([(2 / 3) ** 3, (1 / 3) ** 3, 0.0, 0.0])
    sparsity = [r['nm_sparsity'] for r in rows if 'nm_sparsity' in r]
    assert sparsity[-1] == pytest.approx(15 / 16, abs=1e-3) and sparsity[0] < sparsity[-1]
    assert any('coco/segm_mAP' in r for r in rows)


def test_frozen_stage_is_masked_but_not_trained(maxq_runs):
    base, _, _ = maxq_runs
    s2, s4 = _state(base / 'full' / 'iter_2.pth'), _state(base / 'full' / 'iter_4.pth')
    key = 'backbone.layer1.0.conv1'
    assert torch.equal(s2[f'{key}.weight'], s4[f'{key}.weight'])   # frozen
    assert (s4[f'{key}.mask'] == 0).float().mean() > 0.9           # but N:M at the end
    assert not torch.equal(s2['backbone.layer2.0.conv1.weight'], s4['backbone.layer2.0.conv1.weight'])


def test_resume_is_exact(maxq_runs):
    base, _, resumed = maxq_runs
    assert 'resumed epoch: 0, iter: 2' in resumed.stdout + resumed.stderr
    full, res = _state(base / 'full' / 'iter_4.pth'), _state(base / 'resumed' / 'iter_4.pth')
    assert full.keys() == res.keys()
    for key in full:
        torch.testing.assert_close(res[key], full[key], rtol=0, atol=0, msg=key)
