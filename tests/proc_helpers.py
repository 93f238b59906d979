"""Subprocesses of the end-to-end tests that leave nothing behind, and free ports for DDP runs.

A run is started in its own session (so its own process group) with a unique tag in its
environment. Every process it starts inherits either the group (data-loader workers, forked) or
the tag (torchrun's workers: torch's elastic agent starts each in a new session of its own, so
they leave the group). :meth:`GroupRun.kill` kills both sets and waits until none is left: a
``kill -9`` of the run's main process alone leaves DDP workers training on, and a test that
fails half-way would otherwise leave its runs alive for minutes.
"""
import os
import signal
import socket
import subprocess
import time
import uuid
from typing import List, Optional, Sequence

#: environment variable carrying a run's tag into every process it starts
TAG_VAR = 'MMSPARSE_TEST_RUN'


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: bind port 0, read the port the kernel chose, close."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _state_and_group(pid: int) -> Optional[tuple]:
    """``(state, pgid)`` of ``pid`` from ``/proc/<pid>/stat``; None once it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[2])


def _has_tag(pid: int, entry: bytes) -> bool:
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return entry in f.read().split(b'\0')
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


class GroupRun:
    """``subprocess.Popen(cmd, **popen_kwargs)`` in a new session, its environment tagged.

    Use as a context manager: leaving the block kills every process of the run
    (:meth:`kill`) and, unless an exception is already on its way, fails if any survived.
    """

    def __init__(self, cmd: Sequence[str], env: Optional[dict] = None, **popen_kwargs) -> None:
        self.tag = uuid.uuid4().hex
        self._entry = f'{TAG_VAR}={self.tag}'.encode()
        env = {**(os.environ if env is None else env), TAG_VAR: self.tag}
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, **popen_kwargs)
        self.pgid = self.proc.pid   # a session leader leads its own process group

    def alive(self) -> List[int]:
        """Live (non-zombie) processes of the run: carrying its tag, or in its process group
        while the main process is not reaped (its pid, the group id, cannot be reused)."""
        in_group = self.proc.returncode is None
        pids = []
        for name in os.listdir('/proc'):
            if not name.isdigit():
                continue
            pid = int(name)
            info = _state_and_group(pid)
            if info is None or info[0] in 'ZX':
                continue
            if (in_group and info[1] == self.pgid) or _has_tag(pid, self._entry):
                pids.append(pid)
        return pids

    def wait_gone(self, timeout: float) -> List[int]:
        """Wait up to ``timeout`` s for every process of the run to end; return those left."""
        deadline = time.monotonic() + timeout
        left = self.alive()
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.alive()
        return left

    def kill(self, timeout: float = 30.0) -> List[int]:
        """SIGKILL the process group and every tagged process, reap the main process, and wait
        until none is left; return the processes still alive after ``timeout`` s."""
        if self.proc.poll() is None:   # not reaped yet, so the group id cannot have been reused
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while True:
            left = self.alive()
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.poll()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if self.proc.pid not in left:
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.wait_gone(0)

    def __enter__(self) -> 'GroupRun':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        left = self.kill()
        if left and exc_type is None:
            raise AssertionError(f'processes of {self.proc.args} survived SIGKILL: {left}')


def run_group(cmd: Sequence[str], timeout: float, cwd: Optional[str] = None,
              env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)`` as a
    :class:`GroupRun`: when it returns or raises (e.g. on the timeout), every process the command
    started is gone."""
    with GroupRun(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True) as run:
        out, err = run.proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(run.proc.args, run.proc.returncode, out, err)
