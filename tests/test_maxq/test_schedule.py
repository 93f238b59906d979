import math

import pytest

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
    # MaxQ code: sch = 1 - exp(-0.05 * arange(10)); p = 1 - sch[5] / sch[-1]
    sch5, sch9 = 1 - math.exp(-0.25), 1 - math.exp(-0.45)
    assert preserve_rate(15, 10, 20, 'exp') == pytest.approx(1 - sch5 / sch9)
    assert preserve_rate(19, 10, 20, 'exp') == pytest.approx(0.0)


def test_monotone_non_increasing():
    for schedule in ('linear', 'cubic', 'cos', 'exp'):
        values = [preserve_rate(t, 0, 100, schedule) for t in range(0, 101)]
        assert all(a >= b for a, b in zip(values, values[1:])), schedule


def test_zero_window_means_nm_from_the_start():
    assert preserve_rate(0, 0, 0, 'cubic') == 0.0


@pytest.mark.parametrize('args,match', [
    (dict(schedule='step'), 'unknown preserve-rate schedule'),
    (dict(start=10, end=5), 'start <= end'),
    (dict(start=-1, end=5), 'start <= end'),
])
def test_bad_schedules(args, match):
    kwargs = dict(t=0, start=0, end=10, schedule='cubic')
    kwargs.update(args)
    with pytest.raises(ValueError, match=match):
        preserve_rate(**kwargs)
