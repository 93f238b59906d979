"""tests/proc_helpers.py: a killed launcher's workers, in sessions of their own, are found and
killed; free ports are free. A stand-in launcher keeps this fast: like torchrun it starts each
"rank" with ``start_new_session=True``, and each rank forks a "data-loader worker"."""
import signal
import socket
import subprocess
import sys
import time

import pytest
from proc_helpers import GroupRun, free_port, run_group

LAUNCHER = '''
import os, subprocess, sys, time
worker = """
import os, time
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""
ranks = [subprocess.Popen([sys.executable, '-c', worker], start_new_session=True)
         for _ in range(2)]
time.sleep(600)
'''


def _live(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def _group(pid: int) -> int:
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[2])


def _wait_for(run: GroupRun, count: int, timeout: float = 30.0) -> list:
    deadline = time.monotonic() + timeout
    while len(run.alive()) < count:
        assert run.proc.poll() is None and time.monotonic() < deadline, run.alive()
        time.sleep(0.05)
    return run.alive()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_kill_reaches_workers_that_left_the_group():
    with GroupRun([sys.executable, '-c', LAUNCHER]) as run:
        pids = _wait_for(run, 5)   # launcher, 2 ranks, a worker of each
        others = [p for p in pids if p != run.proc.pid]
        # the ranks and their workers are outside the launcher's group: killpg alone misses them
        assert len(others) == 4 and all(_group(p) != run.pgid for p in others)
        run.proc.send_signal(signal.SIGKILL)   # kill -9 of the launcher alone, as before the fix
        run.proc.wait()
        time.sleep(0.5)
        assert all(_live(p) for p in others), 'the stand-in launcher no longer leaves orphans'
        assert run.kill() == []
    assert not [p for p in pids if _live(p)]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_run_group_timeout_leaves_nothing(tmp_path):
    marker = tmp_path / 'pid'
    rank = f'import os, time\nopen({str(marker)!r}, "w").write(str(os.getpid()))\ntime.sleep(600)\n'
    launcher = ('import subprocess, sys, time\n'
                f'subprocess.Popen([sys.executable, "-c", {rank!r}], start_new_session=True)\n'
                'time.sleep(600)\n')
    with pytest.raises(subprocess.TimeoutExpired):
        run_group([sys.executable, '-c', launcher], timeout=8)
    assert not _live(int(marker.read_text()))
    done = run_group([sys.executable, '-c', 'print("ok")'], timeout=60)
    assert done.returncode == 0 and done.stdout == 'ok\n'


def test_free_port_can_be_bound_on_localhost():
    port = free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', port))
        sock.listen()
