"""The exponential ramp, the phase sequence and schedule validation."""
import math

import numpy as np
import pytest

import mmsparse  # noqa: F401
from mmsparse.sapp import Phase, PhaseSchedule, SequentialAttentionHook, cyclic_phases, ramp


def _spec_share(t: float, T: float, c: float = 4.0, s_target: float = 1.0) -> float:
    """SPEC §3, written independently: s(t) = s_target · (1 − e^{−c·t/T}) / (1 − e^{−c})."""
    return s_target * (1 - math.exp(-c * t / T)) / (1 - math.exp(-c))


@pytest.mark.parametrize('c', [2.0, 4.0, 8.0])
def test_ramp_values(c):
    T = 20
    t = np.arange(T + 1)
    expected = (1 - np.exp(-c * t / T)) / (1 - np.exp(-c))
    assert [ramp(k / T, c) for k in t] == pytest.approx(expected.tolist(), rel=1e-12, abs=1e-15)
    assert ramp(0.0, c) == 0.0 and ramp(1.0, c) == pytest.approx(1.0, rel=1e-12)
    # halfway, (1 − e^{−c/2}) / (1 − e^{−c}) = 1 / (1 + e^{−c/2}): 0.7311, 0.8808, 0.9820
    assert ramp(0.5, c) == pytest.approx({2.0: 0.7310585786300049, 4.0: 0.8807970779778823,
                                          8.0: 0.9820137900379085}[c], rel=1e-12)


def test_phase_sequence_of_compact_config():
    phases = cyclic_phases(warmup=10, sparsify=20, sparse=5, dense=5, cycles=3)
    assert [(p.kind, p.begin, p.end) for p in phases] == [
        ('dense', 0, 10), ('sparsify', 10, 30), ('sparse', 30, 35), ('dense', 35, 40),
        ('sparsify', 40, 60), ('sparse', 60, 65), ('dense', 65, 70), ('sparsify', 70, 90),
        ('sparse', 90, None)]
    sched = PhaseSchedule(phases, c=4.0)
    kinds = [sched.phase_at(t)[1].kind for t in (0, 9, 10, 29, 30, 34, 35, 39, 40, 90, 10 ** 6)]
    assert kinds == ['dense', 'dense', 'sparsify', 'sparsify', 'sparse', 'sparse', 'dense', 'dense',
                     'sparsify', 'sparse', 'sparse']


def test_levels_along_the_ramp():
    sched = PhaseSchedule(cyclic_phases(warmup=2, sparsify=4, sparse=1, dense=1, cycles=2), c=4.0)
    # iteration t of the phase [2, 6) (T = 4) runs at the share s(t - 2 + 1)
    levels = [sched.level_at(t) for t in range(12)]
    assert levels[:2] == [0.0, 0.0]
    assert levels[2:6] == pytest.approx([_spec_share(k, 4) for k in (1, 2, 3, 4)], rel=1e-12)
    assert levels[6] == 1.0 and levels[7] == 0.0 and levels[11] == 1.0
    assert sched.n_pruned(2, 0.5, 100) == round(100 * _spec_share(1, 4, s_target=0.5)) == 32
    # two increments per phase: the share steps at the middle and the end
    two = PhaseSchedule(cyclic_phases(2, 4, 1, 1, 2), c=4.0, increments=2)
    half = _spec_share(2, 4)
    assert [two.level_at(t) for t in range(2, 6)] == pytest.approx([0, half, half, 1.0], rel=1e-12)


def test_step_schedules_acdc_and_oneshot():
    acdc = cyclic_phases(warmup=3, sparsify=0, sparse=2, dense=2, cycles=2)
    assert [(p.kind, p.begin) for p in acdc] == [('dense', 0), ('sparse', 3), ('dense', 5),
                                                 ('sparse', 7)]
    assert [(p.kind, p.begin, p.end) for p in cyclic_phases(0, 0, 0, 0, 1)] == [('sparse', 0, None)]


@pytest.mark.parametrize('kwargs,match', [
    (dict(sparsity=0.0), r'sparsity must be a number in \(0, 1\)'),
    (dict(sparsity=1.0), r'sparsity must be a number in \(0, 1\)'),
    (dict(sparsity=1.5), r'sparsity must be a number in \(0, 1\)'),
    (dict(sparsity_overrides={'backbone.*': -0.1}), r'sparsity_overrides'),
    (dict(phases=[dict(type='dense', begin=0, end=10), dict(type='sparsify', begin=5, end=20),
                  dict(type='sparse', begin=20)]), 'overlapping phases'),
    (dict(phases=[dict(type='dense', begin=0, end=10), dict(type='sparse', begin=12)]), 'gap'),
    (dict(phases=[dict(type='dense', begin=0, end=10), dict(type='sparse', begin=10, end=20),
                  dict(type='sparsify', begin=20)]), 'cannot follow'),
    (dict(phases=[dict(type='dense', begin=0)]), 'last phase must be the final sparse'),
    (dict(phases=[dict(type='dense', begin=0, end=4), dict(type='sparse', begin=4)], warmup=3),
     'not both'),
    (dict(warmup=2, sparsify=4, cycles=2), 'need sparse > 0 and dense > 0'),
    (dict(warmup=2, sparsify=4, c=0), 'c must be > 0'),
    (dict(warmup=-1), 'warmup must be an integer'),
])
def test_bad_configs_fail_at_build(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequentialAttentionHook(**kwargs)


def test_explicit_phases_equal_compact_ones():
    hook = SequentialAttentionHook(phases=[dict(type='dense', begin=0, end=2),
                                           dict(type='sparsify', begin=2, end=6),
                                           dict(type='sparse', begin=6)])
    assert hook.phases == [Phase('dense', 0, 2), Phase('sparsify', 2, 6), Phase('sparse', 6, None)]
    assert hook.phases == SequentialAttentionHook(warmup=2, sparsify=4).phases


def test_by_epoch_phases_convert_to_iterations():
    from types import SimpleNamespace
    hook = SequentialAttentionHook(warmup=1, sparsify=2, sparse=1, dense=1, cycles=2, by_epoch=True)
    sched = hook._iteration_schedule(SimpleNamespace(train_dataloader=[None] * 5))
    assert [(p.kind, p.begin, p.end) for p in sched.phases] == [
        ('dense', 0, 5), ('sparsify', 5, 15), ('sparse', 15, 20), ('dense', 20, 25),
        ('sparsify', 25, 35), ('sparse', 35, None)]
    assert sched.level_at(9) == pytest.approx(_spec_share(5, 10), rel=1e-12)  # t = 9 - 5 + 1
