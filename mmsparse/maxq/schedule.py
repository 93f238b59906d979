"""Preserve-rate schedules of MaxQ: the share of blocks still kept dense at progress ``t``.

Pure functions of the progress, so resuming is exact by construction.
"""
import math

SCHEDULES = ('linear', 'cubic', 'cos', 'exp')


def validate_schedule(schedule: str, start: int, end: int) -> None:
    """Raise ``ValueError`` for an unknown curve or an inverted or negative window."""
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown preserve-rate schedule {schedule!r}; choose one of {SCHEDULES}')
    if start < 0 or end < start:
        raise ValueError(f'preserve-rate schedule needs 0 <= start <= end, got start={start}, end={end}')


def preserve_rate(t: int, start: int, end: int, schedule: str = 'cubic',
                  exp_rate: float = 0.05) -> float:
    """Share of blocks kept fully dense at progress ``t`` (1 before ``start``, 0 from ``end``).

    Args:
        t (int): Current progress (iteration or epoch).
        start (int): Progress at which N:M blocks start to appear.
        end (int): Progress from which every block is N:M.
        schedule (str): ``'linear'``, ``'cubic'``, ``'cos'`` or ``'exp'``. Defaults to ``'cubic'``.
        exp_rate (float): Rate ``b`` of the ``'exp'`` curve per unit of ``t``, as in the MaxQ code
            (0.05 per epoch). Defaults to 0.05.

    Returns:
        float: The preserve rate in ``[0, 1]``.
    """
    validate_schedule(schedule, start, end)
    if t >= end:
        return 0.0
    if t < start:
        return 1.0
    x = (t - start) / (end - start)
    if schedule == 'linear':
        return min(max(1.0 - x, 0.0), 1.0)
    if schedule == 'cubic':
        return min(max((1.0 - x) ** 3, 0.0), 1.0)
    if schedule == 'cos':
        return math.cos(0.5 * math.pi * x)
    # 'exp': p = 1 - (1 - e^{-b (t - start)}) / (1 - e^{-b (end - start - 1)}), on integer steps.
    last = end - start - 1
    if last == 0:
        return 1.0
    return 1.0 - (1.0 - math.exp(-exp_rate * (t - start))) / (1.0 - math.exp(-exp_rate * last))
