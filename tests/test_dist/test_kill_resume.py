"""kill -9 and ``--resume`` for every method through tools/train.py, and a SIGKILL while
tools/fold.py writes its output.

The uninterrupted reference run and the run to be killed train side by side (one thread each).
Every run is a :class:`proc_helpers.GroupRun`: however a test ends, no process of it outlives it.
"""
import glob
import os
import os.path as osp
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_config
from proc_helpers import GroupRun, run_group

from mmsparse.compat import safe_load_from_local

pytestmark = pytest.mark.slow
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
# MaxQ family: preserve rate ramps over [0, 4), masks for t+1 after every step, p = 0 at the end.
# CGMQ: calibration on a fresh start only, gates/ranges trained, greedy fix after the last step.
# SA++: dense [0,1) sparsify [1,3) sparse [3,4) dense [4,5) sparsify [5,7) final sparse [7,8);
# killed after the checkpoint of step 2 (or later), the resumed run crosses every phase boundary.
NM_HOOK = dict(type='MaxQHook', schedule='linear', start=0, end=4, interval=1)
RUNS = {
    'maxq': ('configs/demo/maxq_mask-rcnn_r18_1-16_demo.py', NM_HOOK, 6),
    'srste': ('configs/demo/srste_mask-rcnn_r18_1-16_demo.py', NM_HOOK, 6),
    'oneshot': ('configs/demo/oneshot_mask-rcnn_r18_1-16_demo.py', NM_HOOK, 6),
    'acdc': ('configs/sapp/demo/acdc_mask-rcnn_r18_fpn_b16-70_demo.py',
             dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparse=2, dense=1,
                  cycles=2, interval=1), 8),
    'cgmq': ('configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py',
             dict(type='CGMQHook', budget_relative=16 / 1024, input_shape=(3, 96, 96), num_rois=16,
                  calib_batches=2, interval=1), 4),
    'sapp': ('configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py',
             dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparsify=2, sparse=1,
                  dense=1, cycles=2, interval=1), 8),
}


def _config(method: str, tiny_coco: str, work_dir: Path) -> str:
    base, hook, iters = RUNS[method]
    return tiny_config(base, tiny_coco, str(work_dir), max_iters=iters, ckpt_interval=2,
                       **{'load_from': None, 'custom_hooks': [hook],
                          'train_cfg.val_begin': iters + 1})


def kill_and_resume(method: str, tiny_coco: str, root: Path) -> Path:
    """Run uninterrupted and killed-then-resumed side by side; return ``root``."""
    full_cfg = _config(method, tiny_coco, root / 'full')
    killed_cfg = _config(method, tiny_coco, root / 'killed')
    train = osp.join(ROOT, 'tools', 'train.py')
    with GroupRun([sys.executable, train, full_cfg], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                  stderr=subprocess.PIPE, text=True) as full, \
            GroupRun([sys.executable, train, killed_cfg], env=ENV, cwd=ROOT,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as killed:
        deadline = time.time() + 600
        while not (root / 'killed' / 'last_checkpoint').exists():
            assert killed.proc.poll() is None, 'ended before a checkpoint'
            assert time.time() < deadline, 'no checkpoint after 600 s'
            time.sleep(0.1)
        killed.proc.send_signal(signal.SIGKILL)   # kill -9 of the training process alone
        killed.proc.wait()
        # its data-loader worker dies with it (SparseRunner's parent-death signal)
        left = killed.wait_gone(10)
        assert not left, f'processes of the killed run outlived it by 10 s: {left}'
        iters = RUNS[method][2]
        assert not (root / 'killed' / f'iter_{iters}.pth').exists()
        _, err = full.proc.communicate(timeout=900)
        assert full.proc.returncode == 0, err[-5000:]
    resumed = run_group([sys.executable, train, killed_cfg, '--resume'], timeout=900, cwd=ROOT,
                        env=ENV)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    assert re.search(rf'--resume: resuming from {root / "killed"}/iter_\d+\.pth, the latest', log)
    assert 'resumed epoch: 0, iter:' in log   # mmengine's own line: a real resume, not a fresh run
    return root


def assert_same_final(root: Path, iters: int) -> tuple:
    """The final checkpoints of both runs, after checking their state dicts are bit-identical."""
    a = safe_load_from_local(str(root / 'full' / f'iter_{iters}.pth'))
    b = safe_load_from_local(str(root / 'killed' / f'iter_{iters}.pth'))
    assert set(a['state_dict']) == set(b['state_dict'])
    for key, value in a['state_dict'].items():
        torch.testing.assert_close(b['state_dict'][key], value, rtol=0, atol=0, msg=key)
    return a, b


@pytest.mark.parametrize('method', ['maxq', 'srste', 'oneshot', 'acdc'])
def test_kill_and_resume_equals_uninterrupted(method, tiny_coco, tmp_path):
    root = kill_and_resume(method, tiny_coco, tmp_path)
    a, _ = assert_same_final(root, RUNS[method][2])
    masks = [v for k, v in a['state_dict'].items() if k.endswith(('.mask', '.support'))]
    assert masks and any(bool((m == 0).any()) for m in masks)  # the sparse state was compared


def test_cgmq_kill_and_resume_equals_uninterrupted(tiny_coco, tmp_path):
    root = kill_and_resume('cgmq', tiny_coco, tmp_path)
    a, b = assert_same_final(root, 4)
    assert a['meta']['cgmq'] == b['meta']['cgmq'] and a['meta']['cgmq']['within_budget']


@pytest.fixture(scope='module')
def sapp_runs(tiny_coco, tmp_path_factory) -> Path:
    return kill_and_resume('sapp', tiny_coco, tmp_path_factory.mktemp('sapp_kill'))


def test_sapp_kill_and_resume_across_phases_equals_uninterrupted(sapp_runs):
    a, _ = assert_same_final(sapp_runs, 8)
    supports = [v for k, v in a['state_dict'].items() if k.endswith('.support')]
    assert supports and min(float((s == 0).float().mean()) for s in supports) >= 0.69


def test_sigkill_while_fold_writes_keeps_previous_file(sapp_runs):
    """A real SIGKILL from outside while tools/fold.py's torch.save writes the temp file: the
    previously folded checkpoint and config stay byte-identical; the partial temp file is left
    (SIGKILL runs no cleanup) and is not loadable."""
    from mmsparse.export import fold_checkpoint
    cfg = str(sapp_runs / 'full' / 'tiny_config.py')
    out = sapp_runs / 'folded'
    fold_checkpoint(cfg, str(sapp_runs / 'full' / 'iter_6.pth'), str(out), out_name='model')
    old_pth, old_py = (out / 'model.pth').read_bytes(), (out / 'model.py').read_bytes()
    for attempt in range(3):  # noqa: B007  (reported after the loop)
        for tmp in glob.glob(str(out / '.tmp-*')):
            os.remove(tmp)
        with GroupRun([sys.executable, osp.join(ROOT, 'tools', 'fold.py'), cfg,
                       str(sapp_runs / 'full' / 'iter_8.pth'), '--out-dir', str(out),
                       '--name', 'model'], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL) as run:
            proc = run.proc
            partial = None
            while partial is None and proc.poll() is None:
                partial = next((e.path for e in os.scandir(out) if e.name.startswith('.tmp-')
                                and e.name.endswith('model.pth') and e.stat().st_size > 0), None)
                time.sleep(0.001)
            proc.send_signal(signal.SIGKILL)  # harmless if it already exited
            proc.wait()
        if partial is not None and osp.exists(partial):
            break
        assert (out / 'model.pth').read_bytes() != old_pth  # finished first: the new file, whole
        (out / 'model.pth').write_bytes(old_pth)
        (out / 'model.py').write_bytes(old_py)
    else:
        pytest.fail('fold finished writing before the kill landed, 3 times')
    assert proc.returncode == -signal.SIGKILL
    assert (out / 'model.pth').read_bytes() == old_pth
    assert (out / 'model.py').read_bytes() == old_py
    size = osp.getsize(partial)
    print(f'killed at attempt {attempt + 1}: temp file {size} bytes, previous file '
          f'{len(old_pth)} bytes intact')
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):
        torch.load(partial, weights_only=True)
