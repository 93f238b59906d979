"""SequentialAttentionHook in an mmengine Runner: phases, momentum reset, logging, exact resume."""
import copy

import pytest
import torch
from helpers import ToyRegression
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.compat import safe_load_from_local, to_plain
from mmsparse.sapp import SAPPLinear, SequentialAttentionHook

# dense [0,1) -> sparsify [1,3) -> sparse [3,4) -> dense [4,5) -> sparsify [5,7) -> sparse [7, end)
PHASES = dict(warmup=1, sparsify=2, sparse=1, dense=1, cycles=2, c=4.0)
MAX_ITERS = 8


class _Toy(BaseModel):

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SAPPLinear(16, 16, block_size=4, min_blocks=4)   # 16 blocks
        self.fc2 = SAPPLinear(16, 8, block_size=4, min_blocks=4)    # 8 blocks
        self.head = SAPPLinear(8, 8, block_size=4, min_blocks=100)  # dense by rule

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.head(torch.relu(self.fc2(torch.relu(self.fc1(inputs)))))
        if mode == 'loss':
            return dict(loss=(out - targets).pow(2).mean())
        return out


def _runner(work_dir, name, resume_from=None, hook=None, optimizer=None, model=None):
    return Runner(
        model=model or _Toy(), work_dir=str(work_dir), experiment_name=name,
        train_dataloader=dict(dataset=ToyRegression(), sampler=dict(type='InfiniteSampler', shuffle=False),
                              batch_size=4, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=optimizer or dict(type='SGD', lr=0.1, momentum=0.9,
                                                       weight_decay=1e-3)),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS),
        custom_hooks=[hook or dict(type='SequentialAttentionHook', sparsity=0.5,
                                   sparsity_overrides={'fc2': 0.75}, interval=1, **PHASES)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1),
                           safe_checkpoint=dict(type='SafeCheckpointHook')),
        log_processor=dict(by_epoch=False), randomness=dict(seed=0),
        resume=resume_from is not None, load_from=resume_from)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp('sapp_runs')
    full = _runner(base / 'full', 'sapp_full')
    full.train()
    for start in (2, 4):
        ckpt = str(base / 'full' / f'iter_{start}.pth')
        _runner(base / f'from{start}', f'sapp_from{start}', ckpt).train()
    return base, full


def _ckpt(path):
    return safe_load_from_local(str(path), 'cpu')


def test_supports_follow_the_phases(runs):
    base, full = runs
    it2, it4, it8 = (_ckpt(base / 'full' / f'iter_{i}.pth')['state_dict'] for i in (2, 4, 8))
    # iteration 2 is the last of the first sparsify phase: full target (8 of 16, 6 of 8 blocks)
    assert int((it2['fc1.support'] == 0).sum()) == 8 and int((it2['fc2.support'] == 0).sum()) == 6
    # iteration 4 begins a DENSE phase: support released, revived weights restart from 0
    assert int((it4['fc1.support'] == 0).sum()) == 0
    assert int((it4['fc1.weight'] == 0).sum()) == 8 * 16
    assert int((it8['fc1.support'] == 0).sum()) == 8 and 'head.support' not in it8
    # pruned blocks are exact zeros in the weights
    keep = it8['fc1.support'].repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert it8['fc1.weight'][keep == 0].abs().sum() == 0
    hub = full.message_hub
    assert hub.get_scalar('train/sapp_phase').current() == 2
    assert hub.get_scalar('train/sapp_block_sparsity').current() == pytest.approx(14 / 24)
    assert 0.0 < hub.get_scalar('train/sapp_attn_entropy').current() <= 1.0


def test_momentum_of_revived_weights_is_reset(runs):
    base, _ = runs
    before = _ckpt(base / 'full' / 'iter_2.pth')
    after = _ckpt(base / 'full' / 'iter_4.pth')
    names = [n for n, p in _Toy().named_parameters()]
    slot = names.index('fc1.weight')
    pruned = before['state_dict']['fc1.support'].repeat_interleave(4, 0).repeat_interleave(4, 1) == 0
    mom_before = before['optimizer']['state'][slot]['momentum_buffer']
    assert mom_before[pruned].abs().sum() > 0  # stale momentum would move the revived weights
    mom_after = after['optimizer']['state'][slot]['momentum_buffer']
    revived = after['state_dict']['fc1.weight'] == 0
    assert revived.sum() == 8 * 16 and mom_after[revived].abs().sum() == 0
    assert mom_after[~revived].abs().sum() > 0


def test_reset_optimizer_state_sgd_and_adam():
    p = nn.Parameter(torch.ones(4, 4))
    revived = torch.zeros(4, 4, dtype=torch.bool)
    revived[:2, :2] = True
    for opt in (torch.optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.AdamW([p], lr=0.1)):
        p.grad = torch.ones(4, 4)
        opt.step()
        SequentialAttentionHook.reset_optimizer_state([opt], p, revived)
        for key, value in opt.state[p].items():
            if value.shape == p.shape:
                assert value[revived].abs().sum() == 0 and value[~revived].abs().sum() > 0, key


@pytest.mark.parametrize('start', [2, 4])
def test_resume_across_phase_boundaries_is_exact(runs, start):
    base, _ = runs
    full = _ckpt(base / 'full' / 'iter_8.pth')
    resumed = _ckpt(base / f'from{start}' / 'iter_8.pth')
    assert resumed['meta']['iter'] == 8
    for key, value in full['state_dict'].items():
        torch.testing.assert_close(resumed['state_dict'][key], value, rtol=0, atol=0, msg=key)
    for slot, state in full['optimizer']['state'].items():
        for name, value in state.items():
            torch.testing.assert_close(resumed['optimizer']['state'][slot][name], value, rtol=0,
                                       atol=0)


def test_resume_without_support_fails(runs, tmp_path):
    base, _ = runs
    ckpt = _ckpt(base / 'full' / 'iter_4.pth')
    ckpt = copy.deepcopy(ckpt)
    for key in [k for k in ckpt['state_dict'] if k.endswith('.support')]:
        del ckpt['state_dict'][key]
    path = tmp_path / 'nosupport.pth'
    ckpt['message_hub'] = to_plain(ckpt['message_hub'])
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match='path-dependent'):
        _runner(tmp_path / 'wd', 'sapp_nosupport', str(path)).train()


def test_final_phase_after_training_end_fails_before_training(tmp_path):
    hook = dict(type='SequentialAttentionHook', sparsity=0.5, warmup=4, sparsify=4)
    with pytest.raises(ValueError, match='final sparse phase begins at iteration 8'):
        _runner(tmp_path, 'sapp_too_long', hook=hook).train()


def test_unknown_override_pattern_fails(tmp_path):
    hook = dict(type='SequentialAttentionHook', sparsity=0.5, sparsity_overrides={'fc9': 0.5})
    with pytest.raises(ValueError, match='match no block-sparse layer'):
        _runner(tmp_path, 'sapp_bad_override', hook=hook).train()


class _MagToy(_Toy):

    def __init__(self):
        super().__init__()
        from mmsparse.sapp import MagnitudeBlockLinear
        fc1 = MagnitudeBlockLinear(16, 16, block_size=4, min_blocks=4)
        fc1.weight = self.fc1.weight
        self.fc1 = fc1


def test_oneshot_prunes_smallest_blocks_of_the_initial_weights(tmp_path):
    hook = dict(type='SequentialAttentionHook', sparsity=0.5, interval=1)  # one-shot at step 0
    runner = _runner(tmp_path / 'oneshot', 'sapp_oneshot', hook=hook, model=_MagToy())
    norms = runner.model.fc1.weight.detach().reshape(4, 4, 4, 4).transpose(1, 2).flatten(2).norm(dim=2)
    runner.train()
    kept = runner.model.fc1.support.flatten() != 0
    assert int((~kept).sum()) == 8
    assert norms.flatten()[kept].min() > norms.flatten()[~kept].max()


def test_frozen_layers_stay_unpruned(tmp_path):
    model = _Toy()
    model.fc1.requires_grad_(False)  # e.g. mmdet's frozen_stages
    hook = dict(type='SequentialAttentionHook', sparsity=0.5, interval=1)
    runner = _runner(tmp_path, 'sapp_frozen', hook=hook, model=model)
    runner.train()
    assert runner.model.fc1.n_pruned == 0 and runner.model.fc2.n_pruned == 4
