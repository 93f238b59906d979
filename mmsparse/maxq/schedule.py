"""Preserve-rate schedules of MaxQ: the share of blocks still kept dense at progress ``t``.

Pure functions of the progress, so resuming is exact by construction.
"""
import math

SCHEDULES = ('linear', 'cubic', 'cos', 'exp')

# Curvature of the 'exp' curve that reproduces the MaxQ reference code's curve: rate b = 0.05 per
# epoch, 1 at the window's first epoch and 0 at its last, 29 epochs later (window 0 -> 30 of the
# ImageNet scripts), i.e. c = 0.05 * 29 on the normalised progress.
EXP_CURVATURE = 1.45


def validate_schedule(schedule: str, start: int, end: int,
                      exp_curvature: float = EXP_CURVATURE) -> None:
    """Raise ``ValueError`` for an unknown curve, a bad window (inverted, negative) or curvature."""
    if schedule not in SCHEDULES:
        raise ValueError(f'unknown preserve-rate schedule {schedule!r}; choose one of {SCHEDULES}')
    if start < 0 or end < start:
        raise ValueError(f'preserve-rate schedule needs 0 <= start <= end, got start={start}, end={end}')
    if not (isinstance(exp_curvature, (int, float)) and math.isfinite(exp_curvature)
            and exp_curvature > 0):
        raise ValueError(f'exp_curvature must be a finite number > 0, got {exp_curvature!r}')


def preserve_rate(t: int, start: int, end: int, schedule: str = 'cubic',
                  exp_curvature: float = EXP_CURVATURE) -> float:
    """Share of blocks kept fully dense at progress ``t`` (1 before ``start``, 0 from ``end``).

    Every curve is a function of x = (t - start) / (end - start), so its shape does not depend on
    the unit or the length of the window.

    Args:
        t (int): Current progress (iteration or epoch).
        start (int): Progress at which N:M blocks start to appear.
        end (int): Progress from which every block is N:M.
        schedule (str): ``'linear'``, ``'cubic'``, ``'cos'`` or ``'exp'``. Defaults to ``'cubic'``.
        exp_curvature (float): Curvature c > 0 of the ``'exp'`` curve
            p = 1 - (1 - e^{-c x}) / (1 - e^{-c}); the larger, the earlier blocks turn N:M.
            Defaults to 1.45, the shape of the MaxQ reference code (0.05 per epoch over 29 epochs).

    Returns:
        float: The preserve rate in ``[0, 1]``.
    """
    validate_schedule(schedule, start, end, exp_curvature)
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
    # 'exp': 1 - (1 - e^{-c x}) / (1 - e^{-c}), with expm1 for accuracy at small c
    return 1.0 - math.expm1(-exp_curvature * x) / math.expm1(-exp_curvature)
