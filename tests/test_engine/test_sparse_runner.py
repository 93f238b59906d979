"""SparseRunner: data-loader workers die with the training process (kill -9 leaves no orphan)."""
import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, tiny_config
from torch.utils.data import DataLoader, Dataset

from mmsparse.engine import bind_workers_to_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl is Linux-only')


class _DeathSignal(Dataset):
    """Each item is the calling process's parent-death signal and a draw of its torch RNG."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, idx: int):
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)   # PR_GET_PDEATHSIG
        return torch.tensor([sig.value]), torch.rand(1)


def _seed(worker_id: int) -> None:
    torch.manual_seed(1234 + worker_id)


def test_workers_get_the_death_signal_and_keep_their_init_fn():
    loader = DataLoader(_DeathSignal(), batch_size=1, num_workers=1, worker_init_fn=_seed)
    plain = [(int(s), float(r)) for s, r in loader]
    bind_workers_to_parent(loader)
    bind_workers_to_parent(loader)   # idempotent
    bound = [(int(s), float(r)) for s, r in loader]
    assert [s for s, _ in plain] == [0, 0] and [s for s, _ in bound] == [signal.SIGKILL] * 2
    assert [r for _, r in bound] == [r for _, r in plain]   # the loader's own init still runs


def _children(pid: int) -> list:
    out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kill_9_leaves_no_data_loader_worker(tiny_coco, tmp_path):
    cfg = tiny_config('configs/demo/dense_mask-rcnn_r18_fpn_demo.py', tiny_coco,
                      str(tmp_path / 'wd'), max_iters=200, ckpt_interval=1000)
    log = open(tmp_path / 'train.log', 'w+')
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'tools', 'train.py'), cfg],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while 'Iter(train)' not in open(tmp_path / 'train.log').read():
            assert proc.poll() is None and time.time() < deadline, 'training did not start'
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert workers, 'the tiny config trains with a data-loader worker'
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)   # leave nothing behind even when the test fails
    assert not left, f'orphaned workers {left}'
