"""MaxQ, SR-STE and one-shot N:M on two CPU processes (gloo) through tools/dist_train.sh.

Kill/resume of every method: test_kill_resume; CGMQ / SA++ / ACDC DDP: test_ddp_cgmq_sapp.
"""
import os
import os.path as osp
import sys

import pytest
from helpers import ROOT, tiny_config
from proc_helpers import free_port, run_group

from mmsparse.compat import safe_load_from_local

pytestmark = pytest.mark.slow
CONFIGS = {'maxq': 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py',
           'srste': 'configs/demo/srste_mask-rcnn_r18_1-16_demo.py',
           'oneshot': 'configs/demo/oneshot_mask-rcnn_r18_1-16_demo.py'}
HOOK = [dict(type='MaxQHook', schedule='linear', start=0, end=4, interval=1)]


@pytest.mark.parametrize('method', list(CONFIGS))
def test_two_process_ddp_ranks_agree(method, tiny_coco, tmp_path):
    cfg = tiny_config(CONFIGS[method], tiny_coco, str(tmp_path), max_iters=6, **{
        'load_from': None, 'custom_hooks': HOOK, 'train_dataloader.batch_size': 1})
    env = {**os.environ, 'PYTHON': sys.executable, 'PORT': str(free_port()),
           'OMP_NUM_THREADS': '1'}
    proc = run_group(['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg, '2'], timeout=900,
                     cwd=ROOT, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'differ across ranks' not in log
    # MaxQHook compares the masks of all ranks every interval and raises if they differ; rank 0 saved:
    state = safe_load_from_local(str(tmp_path / 'iter_6.pth'))['state_dict']
    mask = state['backbone.layer3.0.conv1.mask']
    assert (mask == 0).float().mean() == pytest.approx(15 / 16)
