"""Helpers for the end-to-end tests: tiny configs derived from the shipped ones, tool runner."""
import os
import os.path as osp
import subprocess
import sys
from typing import List, Optional

import torch
from mmengine.config import Config
from torch.utils.data import Dataset

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable


def tiny_config(base: str, data_root: str, work_dir: str, max_iters: int = 4,
                ckpt_interval: int = 2, **updates) -> str:
    """Write a copy of ``base`` (path under configs/) that trains a few iterations on tiny data.

    Iteration-counted MaxQHook windows of the base config (sized for real training) are scaled to
    ``max_iters``, so that they still end within training; a caller's own ``custom_hooks`` are kept
    as given.
    """
    cfg = Config.fromfile(osp.join(ROOT, base))
    data_root = data_root.rstrip('/') + '/'
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg[split]
        loader.dataset.data_root = data_root
        for step in loader.dataset.pipeline:
            if step['type'] == 'Resize':
                step['scale'] = (96, 96)
        loader.batch_size = 2
        loader.num_workers = 1 if split == 'train_dataloader' else 0
        loader.persistent_workers = split == 'train_dataloader'
    for split in ('val_evaluator', 'test_evaluator'):
        cfg[split].ann_file = data_root + 'annotations/instances_val.json'
    if 'custom_hooks' not in updates:
        base_iters = cfg.train_cfg.get('max_iters')
        for hook in cfg.get('custom_hooks', []):
            if hook['type'] == 'MaxQHook' and not hook.get('by_epoch', False):
                for key in ('start', 'end'):
                    hook[key] = min(hook.get(key, 0) * max_iters // base_iters, max_iters)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    cfg.default_hooks.checkpoint.interval = ckpt_interval
    cfg.default_hooks.checkpoint.max_keep_ckpts = -1
    cfg.default_hooks.logger.interval = 1
    cfg.work_dir = work_dir
    cfg.merge_from_dict(updates)
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, 'tiny_config.py')
    cfg.dump(path)
    return path


def run_tool(tool: str, args: List[str], timeout: int = 600, check: bool = True,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``tools/<tool>`` in a subprocess from the repo root; return the completed process."""
    proc = subprocess.run([PY, osp.join(ROOT, 'tools', tool), *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f'{tool} {args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n'
                             f'{proc.stderr[-6000:]}')
    return proc


class ToyRegression(Dataset):
    """8 fixed samples ``dict(inputs=(16,), targets=(8,))`` for toy runners: 2 batches of 4."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 16, generator=g)
        self.y = torch.randn(8, 8, generator=g)

    def __len__(self):
        return 8

    def __getitem__(self, idx):
        return dict(inputs=self.x[idx], targets=self.y[idx])
