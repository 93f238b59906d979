"""CGMQ in MMEngine's Runner on a tiny model: budget reached without tuning, resume, bad budgets."""

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import mmsparse  # noqa: F401
from mmsparse.cgmq import CGMQConv2d, CGMQHook, CGMQLinear, cgmq_layers, total_bops
from mmsparse.compat import safe_load_from_local


class ToyData(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(idx)
        x = torch.randn(3, 16, 16, generator=g)
        return dict(inputs=x, labels=x.mean().view(1) * torch.arange(1.0, 5.0))


class ToyNet(BaseModel):
    def __init__(self):
        super().__init__()
        self.conv1 = CGMQConv2d(3, 16, 3, padding=1)
        self.conv2 = CGMQConv2d(16, 16, 3, padding=1)
        self.fc = CGMQLinear(16, 4)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.fc(torch.relu(self.conv2(torch.relu(self.conv1(inputs)))).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.mse_loss(out, labels))
        return out


def make_runner(work_dir, max_iters=30, budget=16 / 1024, resume=False, load_from=None,
                optim_type='CGMQOptimWrapper', **hook_kw):
    return Runner(
        model=ToyNet(), work_dir=str(work_dir),
        train_dataloader=DataLoader(ToyData(), batch_size=8, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        optim_wrapper=dict(type=optim_type, optimizer=dict(type='Adam', lr=1e-2)),
        custom_hooks=[dict(type='CGMQHook', budget_relative=budget, input_shape=(3, 16, 16),
                           calib_batches=2, interval=1, **hook_kw)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=10, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1),
                           safe=dict(type='SafeCheckpointHook'), rng=dict(type='RNGStateHook')),
        randomness=dict(seed=0), resume=resume, load_from=load_from,
        log_level='INFO')


def _hook(runner):
    return next(h for h in runner.hooks if isinstance(h, CGMQHook))


def test_tiny_run_from_8_8_meets_4_4_budget_without_tuning(tmp_path):
    runner = make_runner(tmp_path / 'run', max_iters=30)
    runner.train()
    hook = _hook(runner)
    layers = [lay for _, lay in cgmq_layers(runner.model)]
    final = total_bops(layers)
    assert hook.trajectory[0][1] > hook.budget  # started at 8/8
    assert final <= hook.budget == int(16 / 1024 * hook.full)
    # CGGD met the budget during training (not only the final greedy fix)
    assert any(b <= hook.budget for _, b in hook.trajectory[:-1])
    print('BOPs trajectory (iter, relative):',
          [(i, round(b / hook.full, 5)) for i, b in hook.trajectory])
    ckpt = safe_load_from_local(str(tmp_path / 'run' / 'iter_30.pth'))
    assert ckpt['meta']['cgmq']['within_budget'] and ckpt['meta']['cgmq']['bops'] == final


def test_resume_restores_gates_ranges_and_bops_exactly(tmp_path):
    full = make_runner(tmp_path / 'full', max_iters=20)
    full.train()
    resumed = make_runner(tmp_path / 'resumed', max_iters=20, resume=True,
                          load_from=str(tmp_path / 'full' / 'iter_10.pth'))
    mid = safe_load_from_local(str(tmp_path / 'full' / 'iter_10.pth'))['state_dict']
    calibrated = []
    orig = CGMQHook.calibrate

    def spy(self, runner):
        # the checkpoint's gates and ranges are in place when before_train runs
        for key in ('conv1.weight_gate', 'conv2.act_range', 'fc.act_gate', 'conv1.act_signed'):
            assert torch.equal(runner.model.state_dict()[key], mid[key]), key
        calibrated.append(orig(self, runner))
        return calibrated[-1]

    CGMQHook.calibrate = spy
    try:
        resumed.train()
    finally:
        CGMQHook.calibrate = orig
    assert calibrated == [0]  # calibration did not rerun on resume
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    assert _hook(full).trajectory[-1] == _hook(resumed).trajectory[-1]


def test_bad_budgets_fail_early(tmp_path):
    with pytest.raises(ValueError, match='exactly one of budget_relative'):
        CGMQHook()
    with pytest.raises(ValueError, match=r'budget_relative must be in \(0, 1\]'):
        CGMQHook(budget_relative=2.0)
    with pytest.raises(ValueError, match='budget_gbops must be a positive'):
        CGMQHook(budget_gbops=-1)
    runner = make_runner(tmp_path / 'low', budget=2 / 1024)  # below the all-2-bit model (4/1024)
    with pytest.raises(ValueError, match='unreachable relative budget'):
        runner.train()
    assert runner.iter == 0


def test_greedy_fix_when_plain_optimizer_wrapper(tmp_path):
    runner = make_runner(tmp_path / 'plain', max_iters=3, optim_type='OptimWrapper')
    runner.train()
    hook = _hook(runner)
    assert total_bops(lay for _, lay in cgmq_layers(runner.model)) <= hook.budget
