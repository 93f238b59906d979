"""DDP on two CPU processes (gloo) and kill -9 / resume, through the real tools."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, run_tool, tiny_config

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


def test_kill_and_resume_equals_uninterrupted(tiny_coco, tmp_path):
    full = _cfg(tiny_coco, str(tmp_path / 'full'))
    run_tool('train.py', [full])
    killed_dir = tmp_path / 'killed'
    killed = _cfg(tiny_coco, str(killed_dir))
    proc = subprocess.Popen([sys.executable, osp.join(ROOT, 'tools', 'train.py'), killed], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed_dir / 'last_checkpoint').exists():
        assert proc.poll() is None and time.time() < deadline, 'training ended before a checkpoint'
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / 'iter_6.pth').exists()
    run_tool('train.py', [killed, '--resume'])
    a = safe_load_from_local(str(tmp_path / 'full' / 'iter_6.pth'))['state_dict']
    b = safe_load_from_local(str(killed_dir / 'iter_6.pth'))['state_dict']
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
