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
    def __init__(self, conv1_per_channel=True):
        super().__init__()
        self.conv1 = CGMQConv2d(3, 16, 3, padding=1, per_channel=conv1_per_channel)
        self.conv2 = CGMQConv2d(16, 16, 3, padding=1)
        self.fc = CGMQLinear(16, 4)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.fc(torch.relu(self.conv2(torch.relu(self.conv1(inputs)))).mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.mse_loss(out, labels))
        return out


class PlainToyNet(ToyNet):
    """ToyNet with plain layers (same names): a dense model's checkpoint."""

    def __init__(self):
        BaseModel.__init__(self)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)


def make_runner(work_dir, max_iters=30, budget=16 / 1024, resume=False, load_from=None,
                optim_type='CGMQOptimWrapper', model=None, **hook_kw):
    return Runner(
        model=model or ToyNet(), work_dir=str(work_dir),
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


def test_resume_restores_gates_ranges_and_bops_exactly(tmp_path, monkeypatch):
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

    monkeypatch.setattr(CGMQHook, 'calibrate', spy)
    resumed.train()
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


def _plain_checkpoint(tmp_path):
    """A dense run's checkpoint, and the same without optimizer state (pretrained weights)."""
    dense = Runner(
        model=PlainToyNet(), work_dir=str(tmp_path / 'dense'),
        train_dataloader=DataLoader(ToyData(), batch_size=8, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=2),
        optim_wrapper=dict(optimizer=dict(type='Adam', lr=1e-2)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           safe=dict(type='SafeCheckpointHook')),
        randomness=dict(seed=0))
    dense.train()
    path = str(tmp_path / 'dense' / 'iter_2.pth')
    ckpt = torch.load(path, weights_only=True)  # plain types (SafeCheckpointHook)
    del ckpt['optimizer']
    weights_only = str(tmp_path / 'dense_weights.pth')
    torch.save(ckpt, weights_only)
    return path, weights_only, ckpt['state_dict']


def test_resume_from_plain_checkpoint_fails_clearly(tmp_path):
    """A checkpoint without the CGMQ gates and ranges cannot be resumed (SPEC §0): one clear
    error naming the missing keys, before anything is loaded or trained."""
    path, weights_only, _ = _plain_checkpoint(tmp_path)
    for i, ckpt in enumerate((weights_only, path)):
        runner = make_runner(tmp_path / f'resume{i}', max_iters=4, resume=True, load_from=ckpt)
        with pytest.raises(RuntimeError, match=r'lacks the CGMQ state of 18 keys .*'
                           r"conv1\.weight_range.*use load_from instead of resume"):
            runner.train()
        assert runner.iter == 0
        assert not bool(runner.model.conv1.calibrated)


def test_load_from_plain_checkpoint_calibrates(tmp_path, monkeypatch):
    """``load_from`` a plain checkpoint: its weights are loaded, gates start at the configured
    widths, and the ranges are calibrated from the loaded weights."""
    _, weights_only, state = _plain_checkpoint(tmp_path)
    runner = make_runner(tmp_path / 'load', max_iters=2, load_from=weights_only)
    seen = []
    orig = CGMQHook.calibrate

    def spy(self, runner):
        model = runner.model
        assert torch.equal(model.conv2.weight, state['conv2.weight'])
        # 8 bits: g4, g8 on at +gate_init (0.1), g16, g32 off
        assert torch.equal(model.fc.weight_gate.detach(), torch.tensor([0.1, 0.1, -0.1, -0.1]))
        seen.append(orig(self, runner))
        per_channel_max = state['conv2.weight'].abs().flatten(1).amax(1)
        assert torch.equal(model.conv2.weight_range.detach(), per_channel_max)
        return seen[-1]

    monkeypatch.setattr(CGMQHook, 'calibrate', spy)
    runner.train()
    assert seen == [3] and runner.iter == 2


def test_checkpoint_of_differently_configured_cgmq_model_is_refused(tmp_path):
    """conv1's range per tensor in the checkpoint, per channel in the model: MMEngine would skip
    that key (shape mismatch) and keep ``calibrated``, training from the default range."""
    other = make_runner(tmp_path / 'other', max_iters=10, model=ToyNet(conv1_per_channel=False))
    other.train()
    ckpt = str(tmp_path / 'other' / 'iter_10.pth')
    for resume in (False, True):
        runner = make_runner(tmp_path / f'mine{resume}', max_iters=12, resume=resume,
                             load_from=ckpt)
        with pytest.raises(RuntimeError, match=r"lacks the CGMQ state of 1 keys .*"
                           r"\['conv1\.weight_range'\]"):
            runner.train()
