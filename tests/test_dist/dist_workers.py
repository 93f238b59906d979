"""Process-group workers for the DDP tests: run in children spawned by ``torch.multiprocessing``.

Each worker joins a real gloo group and trains the small CNN of ``tools/benchmark_accuracy.py`` on
sklearn digits through MMEngine's ``Runner`` (``launcher='pytorch'``: the runner wraps the model in
``MMDistributedDataParallel`` and uses the existing group), with each method's layers, hooks and
optimizer wrapper as the benchmark configures them.
"""
import importlib.util
import json
import os
import os.path as osp
import sys
from types import ModuleType
from typing import List, Optional

import torch
import torch.distributed as dist
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import mmsparse  # noqa: F401  registers layers, hooks, optimizer wrappers
import rank_state_hook  # noqa: F401  registers RankStateDumpHook

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOTAL_BATCH = 4
LR = 1e-3


def benchmark() -> ModuleType:
    """``tools/benchmark_accuracy.py`` as a module (data, ``DigitsNet``, per-method configs)."""
    if 'benchmark_accuracy' not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            'benchmark_accuracy', osp.join(ROOT, 'tools', 'benchmark_accuracy.py'))
        module = importlib.util.module_from_spec(spec)
        sys.modules['benchmark_accuracy'] = module
        spec.loader.exec_module(module)
    return sys.modules['benchmark_accuracy']


def init_group(rank: int, world: int, port: int) -> None:
    """Join a gloo group of ``world`` processes on this machine (one thread per process)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    if world > 1:
        dist.init_process_group('gloo', rank=rank, world_size=world)


def digits_runner(method: str, work_dir: str, iters: int, world: int, load_from: Optional[str],
                  extra_hooks: tuple = (), find_unused_parameters: Optional[bool] = None) -> Runner:
    """A Runner training ``method`` (a ``benchmark_accuracy.method_configs`` name) for ``iters``.

    The global batch is ``TOTAL_BATCH`` samples, split evenly over ``world`` processes; the
    ``InfiniteSampler`` with a fixed seed gives rank ``r`` the positions ``r::world`` of one
    shuffled stream, so the ranks' batches of step ``t`` together are the single-process batch
    of step ``t``. Method hooks check rank agreement and log at every step.
    """
    bench = benchmark()
    cfg = bench.method_configs(iters)[method]
    x_tr, y_tr, _, _ = bench.load_digits_split()
    optim = dict(cfg['optim'], optimizer=dict(type='AdamW', lr=LR, weight_decay=1e-4))
    if cfg.get('paramwise'):
        optim['paramwise_cfg'] = cfg['paramwise']
    if find_unused_parameters is None:
        find_unused_parameters = method.startswith('sapp')
    return Runner(
        model=cfg['model'], work_dir=work_dir,
        experiment_name=f'{method.replace("/", "_")}_w{world}_{osp.basename(work_dir)}',
        train_dataloader=dict(batch_size=TOTAL_BATCH // world, num_workers=0,
                              dataset=bench.TensorDictDataset(x_tr, y_tr),
                              sampler=dict(type='InfiniteSampler', shuffle=True, seed=0),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=False, max_iters=iters),
        optim_wrapper=optim,
        param_scheduler=[dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=iters,
                              eta_min=LR * 0.01)],
        custom_hooks=[*(dict(h, interval=1) for h in cfg['hooks']),
                      dict(type='RankStateDumpHook'), *extra_hooks],
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=10**6)),
        load_from=load_from, randomness=dict(seed=0), log_level='ERROR',
        launcher='pytorch' if world > 1 else 'none',
        cfg=dict(model_wrapper_cfg=dict(type='MMDistributedDataParallel', device_ids=None,
                                        broadcast_buffers=False,
                                        find_unused_parameters=find_unused_parameters)))


def train_digits(rank: int, world: int, port: int, out_dir: str, methods: List[str], iters: int,
                 load_from: str) -> None:
    """Train every method on ``world`` processes; rank 0 saves each final state dict."""
    init_group(rank, world, port)
    try:
        for method in methods:
            work_dir = osp.join(out_dir, f'{method.replace("/", "_")}_w{world}')
            runner = digits_runner(method, work_dir, iters, world, load_from)
            runner.train()
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            if rank == 0:
                torch.save(model.state_dict(), osp.join(work_dir, 'final.pth'))
    finally:
        if world > 1:
            dist.destroy_process_group()


@HOOKS.register_module()
class PerturbOnRankHook(Hook):
    """Test-only: change one tensor on one rank after step ``step``, before the method hook runs.

    A ``support`` loses its first kept block; any other tensor gets ``+0.5`` on its first element.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, rank: int, step: int, key: str) -> None:
        self.rank, self.step, self.key = rank, step, key

    @torch.no_grad()
    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:  # noqa: D102
        if get_rank() != self.rank or runner.iter + 1 != self.step:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        tensor = {**dict(model.named_parameters()), **dict(model.named_buffers())}[self.key]
        flat = tensor.view(-1)
        if self.key.endswith('support'):
            flat[int(flat.nonzero()[0])] = 0
        else:
            flat[0] += 0.5


# (method, perturbed tensor, step, find_unused_parameters); 12 steps: ACDC is in its final sparse
# phase from step 5 (warmup 1, sparse 2, dense 2), so the zeroed block is not released again
PERTURBATIONS = [
    ('cgmq-16/1024', 'conv2.act_range', 3, None),
    ('sapp-70', 'conv3.block_logits', 3, None),
    ('acdc-70', 'conv3.support', 6, None),
    ('sapp-70', None, None, False),
]


def perturbed_runs(rank: int, port: int, out_dir: str, load_from: str) -> None:
    """Train the :data:`PERTURBATIONS` cases on 2 processes; write each case's error per rank."""
    init_group(rank, 2, port)
    errors = []
    try:
        for idx, (method, key, step, find_unused) in enumerate(PERTURBATIONS):
            hooks = () if key is None else (dict(type='PerturbOnRankHook', rank=1, step=step,
                                                  key=key),)
            runner = digits_runner(method, osp.join(out_dir, f'case{idx}'), 12, 2, load_from,
                                   hooks, find_unused)
            try:
                runner.train()
                errors.append(None)
            except (RuntimeError, ValueError) as err:
                errors.append(f'{type(err).__name__} at iteration {runner.iter}: {err}')
    finally:
        dist.destroy_process_group()
    with open(osp.join(out_dir, f'errors_rank{rank}.json'), 'w') as f:
        json.dump(errors, f)
