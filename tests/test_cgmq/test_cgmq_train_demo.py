"""The demo CGMQ config end to end through tools/train.py on a tiny generated dataset."""
import json

import pytest
from helpers import run_tool, tiny_config

from mmsparse.compat import safe_load_from_local

pytestmark = pytest.mark.slow
DEMO = 'configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'


def test_demo_config_trains_reports_map_and_meets_budget(tiny_coco, tmp_path):
    cfg = tiny_config(DEMO, tiny_coco, str(tmp_path / 'wd'), max_iters=4, ckpt_interval=2,
                      load_from=None,
                      custom_hooks=[dict(type='CGMQHook', budget_relative=16 / 1024,
                                         input_shape=(3, 96, 96), num_rois=64, calib_batches=2,
                                         interval=1)])
    proc = run_tool('train.py', [cfg])
    log = proc.stdout + proc.stderr
    assert 'CGMQHook: calibrated ranges' in log and 'CGMQHook: final model' in log
    ckpt = safe_load_from_local(str(tmp_path / 'wd' / 'iter_4.pth'))
    meta = ckpt['meta']['cgmq']
    assert meta['within_budget'] and meta['bops'] <= meta['budget']
    assert any(k.endswith('weight_gate') for k in ckpt['state_dict'])
    records = [json.loads(line) for line in
               sorted((tmp_path / 'wd').glob('*/vis_data/scalars.json'))[-1].read_text().splitlines()]
    assert any('cgmq_bops_rel' in r for r in records)  # logged from train/cgmq_bops_rel
    metrics = [r for r in records if 'coco/bbox_mAP' in r]
    assert metrics and 0.0 <= metrics[-1]['coco/bbox_mAP'] <= 1.0
    print('final cgmq meta:', {k: v for k, v in meta.items() if k != 'bits'},
          'mAP:', metrics[-1]['coco/bbox_mAP'])
