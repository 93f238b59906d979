import math

import pytest
import torch
from helpers import ToyRegression, tiny_config
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import HOOKS
from mmengine.runner import Runner

import mmsparse  # noqa: F401
from mmsparse.maxq import MaxQLinear
from mmsparse.maxq.schedule import preserve_rate


@pytest.mark.parametrize('schedule', ['linear', 'cubic', 'cos', 'exp'])
def test_endpoints(schedule):
    assert preserve_rate(0, 10, 20, schedule) == 1.0
    assert preserve_rate(9, 10, 20, schedule) == 1.0
    assert preserve_rate(10, 10, 20, schedule) == pytest.approx(1.0)
    assert preserve_rate(20, 10, 20, schedule) == 0.0
    assert preserve_rate(500, 10, 20, schedule) == 0.0


def test_midpoints():
    assert preserve_rate(15, 10, 20, 'linear') == pytest.approx(0.5)
    assert preserve_rate(15, 10, 20, 'cubic') == pytest.approx(0.125)
    assert preserve_rate(15, 10, 20, 'cos') == pytest.approx(math.cos(math.pi / 4))


# p = 1 - (1 - e^{-c x}) / (1 - e^{-c}), by hand for c = 1.45 (1 - e^{-1.45} = 0.7654297):
# x = 0.1: e^{-0.145} = 0.8650223 -> 0.8236576; x = 0.5: e^{-0.725} = 0.4843246 -> 0.3262929;
# x = 0.9: e^{-1.305} = 0.2711725 -> 0.0478192
EXP_BY_HAND = {0.1: 0.8236576, 0.5: 0.3262929, 0.9: 0.0478192}


@pytest.mark.parametrize('start,end', [(10, 20), (0, 30), (1000, 31000)])
def test_exp_matches_the_formula_by_hand(start, end):
    for x, expected in EXP_BY_HAND.items():
        t = start + round(x * (end - start))
        assert preserve_rate(t, start, end, 'exp') == pytest.approx(expected, abs=1e-6), (t, x)


def test_exp_curvature_is_used():
    # c = 3, x = 0.25: 1 - (1 - e^{-0.75}) / (1 - e^{-3}) = 1 - 0.5276334 / 0.9502129 = 0.4447208
    assert preserve_rate(25, 0, 100, 'exp', exp_curvature=3.0) == pytest.approx(0.4447208,
                                                                                 abs=1e-6)


def test_exp_shape_does_not_depend_on_the_window_length():
    """The same x gives the same p on a 30-epoch and a 30000-iteration window."""
    for k in range(30):
        short = preserve_rate(k, 0, 30, 'exp')
        long = preserve_rate(1000 * k, 0, 30000, 'exp')
        assert long == pytest.approx(short, abs=1e-12), k
    # no step: a tenth of the way into a long window most blocks are still dense
    assert preserve_rate(3000, 0, 30000, 'exp') == pytest.approx(EXP_BY_HAND[0.1], abs=1e-6)


def test_exp_default_is_the_maxq_reference_curve():
    """JingyangXiang/MaxQ (mullt_axis_query_v2_pro.py, window 0 -> 30 epochs): b = 0.05,
    sch = 1 - exp(-b * arange(30)), p = 1 - sch[k] / sch[-1], 0 from epoch 29. Over the 29 epochs
    it takes to reach 0, that is the default curve on a window of 29."""
    sch = [1 - math.exp(-0.05 * k) for k in range(30)]
    for k in range(30):
        assert preserve_rate(k, 0, 29, 'exp') == pytest.approx(1 - sch[k] / sch[-1], abs=1e-12), k


@pytest.mark.parametrize('schedule', ['linear', 'cubic', 'cos', 'exp'])
@pytest.mark.parametrize('end', [1, 2, 100, 30000])
def test_monotone_non_increasing(schedule, end):
    values = [preserve_rate(t, 0, end, schedule) for t in range(0, end + 1, max(1, end // 300))]
    assert values[0] == 1.0 and values[-1] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:])), schedule


def test_zero_window_means_nm_from_the_start():
    assert preserve_rate(0, 0, 0, 'cubic') == 0.0


@pytest.mark.parametrize('args,match', [
    (dict(schedule='step'), 'unknown preserve-rate schedule'),
    (dict(start=10, end=5), 'start <= end'),
    (dict(start=-1, end=5), 'start <= end'),
    (dict(schedule='exp', exp_curvature=0.0), 'exp_curvature must be a finite number > 0'),
    (dict(schedule='exp', exp_curvature=-1.0), 'exp_curvature must be a finite number > 0'),
    (dict(schedule='exp', exp_curvature=math.nan), 'exp_curvature must be a finite number > 0'),
])
def test_bad_schedules(args, match):
    kwargs = dict(t=0, start=0, end=10, schedule='cubic')
    kwargs.update(args)
    with pytest.raises(ValueError, match=match):
        preserve_rate(**kwargs)


def test_hook_refuses_the_old_exp_rate_and_says_what_to_use():
    with pytest.raises(ValueError, match=r'MaxQHook: exp_rate=0\.05 is no longer accepted.*'
                                         r'exp_curvature = exp_rate \* \(end - start\) = 1\.5$'):
        HOOKS.build(dict(type='MaxQHook', schedule='exp', start=0, end=30, exp_rate=0.05))
    hook = HOOKS.build(dict(type='MaxQHook', schedule='exp', start=0, end=30, exp_curvature=1.5))
    assert hook.exp_curvature == 1.5


# -- the window against the training length, in mmengine's Runner on a toy model -----------------
class _Toy(BaseModel):

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = MaxQLinear(16, 8, n=1, m=4)

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.fc(inputs)
        if mode == 'loss':
            return dict(loss=(out - targets).pow(2).mean())
        return out


def _runner(tmp_path, hook, train_cfg):
    by_epoch = train_cfg.get('by_epoch', False)
    sampler = dict(type='DefaultSampler' if by_epoch else 'InfiniteSampler', shuffle=False)
    return Runner(
        model=_Toy(), work_dir=str(tmp_path), experiment_name='_'.join(tmp_path.parts[-2:]),
        train_dataloader=dict(dataset=ToyRegression(), sampler=sampler, batch_size=4, num_workers=0,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(type='NMSparseOptimWrapper', optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=train_cfg, custom_hooks=[dict(type='MaxQHook', interval=1, **hook)],
        default_hooks=dict(checkpoint=None, logger=dict(type='LoggerHook', interval=1)),
        log_processor=dict(by_epoch=by_epoch), randomness=dict(seed=0))


ITERS = dict(by_epoch=False, max_iters=6)
EPOCHS = dict(by_epoch=True, max_epochs=3)


@pytest.mark.parametrize('hook,train_cfg,match', [
    (dict(start=0, end=7), ITERS,
     r'^MaxQHook: the preserve-rate window start=0, end=7 iterations ends after training '
     r'\(max_iters=6\).*set end <= 6'),
    (dict(start=2, end=75), ITERS, r'start=2, end=75 iterations .*set end <= 6'),
    (dict(start=0, end=4, by_epoch=True), EPOCHS,
     r'start=0, end=4 epochs ends after training \(3 epochs \(6 iterations\)\).*set end <= 3'),
    # iteration-based loop counted in epochs of its dataloader: 6 iterations of 2 = 3 epochs
    (dict(start=0, end=4, by_epoch=True), ITERS, r'end=4 epochs .*set end <= 3'),
])
def test_window_past_the_end_of_training_is_refused_before_any_step(tmp_path, hook, train_cfg,
                                                                     match):
    runner = _runner(tmp_path, dict(schedule='linear', **hook), train_cfg)
    with pytest.raises(ValueError, match=match):
        runner.train()
    assert runner.iter == 0


@pytest.mark.parametrize('hook,train_cfg', [
    (dict(start=0, end=6), ITERS),
    (dict(start=0, end=3, by_epoch=True), EPOCHS),
    (dict(start=0, end=3, by_epoch=True), ITERS),
])
def test_window_ending_with_training_is_valid(tmp_path, hook, train_cfg):
    runner = _runner(tmp_path, dict(schedule='linear', **hook), train_cfg)
    runner.train()
    assert runner.iter == 6
    mask = runner.model.fc.mask.reshape(-1, 4)
    assert ((mask != 0).sum(dim=1) == 1).all()   # exact 1:4 after the last step


def test_tiny_config_fits_the_shipped_window_into_its_training(tmp_path):
    """The demo's window (0 -> 75 of 150 iterations) would end after a 4-iteration test run."""
    demo = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
    cfg = Config.fromfile(tiny_config(demo, 'data/tiny', str(tmp_path / 'a'), max_iters=4))
    assert [(h.start, h.end) for h in cfg.custom_hooks] == [(0, 2)]   # 75/150 of 4 iterations
    own = [dict(type='MaxQHook', schedule='linear', start=1, end=3)]
    cfg = Config.fromfile(tiny_config(demo, 'data/tiny', str(tmp_path / 'b'), max_iters=4,
                                      custom_hooks=own))
    assert [h.to_dict() for h in cfg.custom_hooks] == own
