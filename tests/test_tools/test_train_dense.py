"""Dense Mask R-CNN through tools/train.py and tools/test.py: train, COCO mAP, checkpoint, resume."""
import json
import os.path as osp

import pytest
import torch
from helpers import run_tool, tiny_config

from mmsparse.compat import safe_load_from_local

pytestmark = pytest.mark.slow
DENSE = 'configs/demo/dense_mask-rcnn_r18_fpn_demo.py'


def _weights(path):
    return safe_load_from_local(path, 'cpu')


@pytest.fixture(scope='module')
def dense_runs(tiny_coco, tmp_path_factory):
    """An uninterrupted 4-iteration run and a run resumed from its iteration-2 checkpoint."""
    base = tmp_path_factory.mktemp('dense')
    full = tiny_config(DENSE, tiny_coco, str(base / 'full'))
    run_tool('train.py', [full])
    resumed = tiny_config(DENSE, tiny_coco, str(base / 'resumed'))
    proc = run_tool('train.py', [resumed, '--resume', str(base / 'full' / 'iter_2.pth')])
    return base, proc


def test_trains_evaluates_and_saves(dense_runs):
    base, _ = dense_runs
    ckpt = _weights(str(base / 'full' / 'iter_4.pth'))
    assert ckpt['meta']['iter'] == 4
    assert any(k.startswith('backbone.layer1') for k in ckpt['state_dict'])
    logs = sorted((base / 'full').glob('*/vis_data/scalars.json'))
    records = [json.loads(line) for line in logs[-1].read_text().splitlines()]
    metrics = [r for r in records if 'coco/bbox_mAP' in r]
    assert metrics and 'coco/segm_mAP' in metrics[-1]
    assert 0.0 <= metrics[-1]['coco/bbox_mAP'] <= 1.0


def test_resume_is_exact(dense_runs):
    base, proc = dense_runs
    assert 'resumed epoch: 0, iter: 2' in proc.stdout + proc.stderr
    full = _weights(str(base / 'full' / 'iter_4.pth'))
    resumed = _weights(str(base / 'resumed' / 'iter_4.pth'))
    for key, value in full['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=0, atol=0, msg=key)
    opt_full, opt_res = full['optimizer']['state'], resumed['optimizer']['state']
    assert opt_full.keys() == opt_res.keys()
    for idx in opt_full:
        for name, value in opt_full[idx].items():
            torch.testing.assert_close(opt_res[idx][name], value, rtol=0, atol=0)


def test_tools_test_reports_map(dense_runs, tiny_coco):
    base, _ = dense_runs
    cfg = osp.join(base, 'full', 'tiny_config.py')
    proc = run_tool('test.py', [cfg, str(base / 'full' / 'iter_4.pth'),
                                '--work-dir', str(base / 'test')])
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr


def test_missing_data_root_fails_before_training(tmp_path):
    cfg = tiny_config(DENSE, str(tmp_path / 'nowhere'), str(tmp_path / 'wd'))
    proc = run_tool('train.py', [cfg], check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f"data root '{tmp_path / 'nowhere'}/' (train_dataloader.dataset.data_root) does not " \
           'exist' in proc.stderr and 'Iter(train)' not in proc.stdout + proc.stderr


def test_unknown_type_fails_before_training(tmp_path, tiny_coco):
    cfg = tiny_config(DENSE, tiny_coco, str(tmp_path / 'wd'),
                      **{'model.backbone.conv_cfg': dict(type='NoSuchConv')})
    proc = run_tool('train.py', [cfg], check=False)
    assert proc.returncode != 0
    assert "model.backbone.conv_cfg: unknown layer type 'NoSuchConv'" in proc.stderr
    assert 'Iter(train)' not in proc.stdout + proc.stderr
