"""SparseRunner: mmengine's Runner whose data-loader workers die with the training process.

A worker whose parent is killed (``kill -9``, the OOM killer, a scheduler's preemption) while the
worker's result queue is full blocks forever in the queue's feeder thread: torch cancels that join
only when the parent sets the shutdown event. Every killed run then left an orphaned worker holding
the dataset and its memory (~400 MB on the demo). Each worker of a loader this runner builds asks
the kernel to kill it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``). The loops start
their workers as soon as they are built, before any hook runs, so this lives in the runner's
``build_dataloader`` rather than in a hook.
"""
import ctypes
import functools
import os
import signal
import sys
from typing import Callable, Optional, Union

from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from torch.utils.data import DataLoader

_PR_SET_PDEATHSIG = 1


def _die_with_parent(worker_init_fn: Optional[Callable[[int], None]], parent: int,
                     worker_id: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_PDEATHSIG) failed')
    if os.getppid() != parent:   # the parent died before the request took effect
        os._exit(1)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def bind_workers_to_parent(dataloader: DataLoader) -> None:
    """Make the workers of ``dataloader`` (started on its first iteration) die with this process.

    The loader's own ``worker_init_fn`` (mmengine's per-worker seeding) still runs, afterwards.
    No-op off Linux and for loaders without workers.
    """
    if not sys.platform.startswith('linux') or dataloader.num_workers == 0:
        return
    current = dataloader.worker_init_fn
    if isinstance(current, functools.partial) and current.func is _die_with_parent:
        return
    dataloader.worker_init_fn = functools.partial(_die_with_parent, current, os.getpid())


@RUNNERS.register_module()
class SparseRunner(Runner):
    """:class:`~mmengine.runner.Runner` whose data-loader workers never outlive it.

    Selected with ``runner_type = 'SparseRunner'`` (set in ``configs/_base_/default_runtime.py``);
    everything else is mmengine's runner unchanged.
    """

    @staticmethod
    def build_dataloader(dataloader: Union[DataLoader, dict], seed: Optional[int] = None,
                         diff_rank_seed: bool = False) -> DataLoader:
        """mmengine's :meth:`~mmengine.runner.Runner.build_dataloader`, workers bound to us."""
        loader = Runner.build_dataloader(dataloader, seed=seed, diff_rank_seed=diff_rank_seed)
        bind_workers_to_parent(loader)
        return loader
