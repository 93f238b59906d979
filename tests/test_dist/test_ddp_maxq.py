"""MaxQ DDP on two CPU processes (gloo) through tools/dist_train.sh (kill/resume: test_kill_resume)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
from helpers import ROOT, tiny_config

from mmsparse.compat import safe_load_from_local

pytestmark = pytest.mark.slow
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
HOOK = [dict(type='MaxQHook', schedule='linear', start=0, end=4, interval=1)]


def _cfg(tiny_coco, work_dir, **updates):
    return tiny_config(MAXQ, tiny_coco, work_dir, max_iters=6,
                       **{'load_from': None, 'custom_hooks': HOOK, **updates})


def test_two_process_ddp_ranks_agree(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, str(tmp_path), **{'train_dataloader.batch_size': 1})
    env = {**os.environ, 'PYTHON': sys.executable, 'PORT': '29613', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg, '2'], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'differ across ranks' not in log
    # MaxQHook all-reduces a mask checksum every interval and raises on disagreement; rank 0 saved:
    state = safe_load_from_local(str(tmp_path / 'iter_6.pth'))['state_dict']
    mask = state['backbone.layer3.0.conv1.mask']
    assert (mask == 0).float().mean() == pytest.approx(15 / 16)
