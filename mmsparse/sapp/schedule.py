"""Phase machine of SequentialAttention++ / ACDC: pure functions of the training progress.

A schedule is a contiguous list of phases ``[begin, end)`` covering training from 0; the last phase is
open-ended (it runs to the end of training) and must be SPARSE. Phase kinds:

* ``'dense'``: every block trainable (support released), logits trained;
* ``'sparsify'``: the pruned share rises along ``s(t) = s_target·(1 − e^{−c·t/T}) / (1 − e^{−c})``,
  the lowest-attention surviving blocks zeroed at each increment, logits trained;
* ``'sparse'``: support fixed at the target, logits frozen. A SPARSE phase straight after a DENSE
  phase (or at the start) prunes to the target at once: ACDC's step schedule and one-shot pruning.

Allowed successions: dense → sparsify | sparse, sparsify → sparse, sparse → dense.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

PHASES = ('dense', 'sparsify', 'sparse')
PHASE_CODES = {'dense': 0, 'sparsify': 1, 'sparse': 2}
_NEXT = {'dense': ('sparsify', 'sparse'), 'sparsify': ('sparse',), 'sparse': ('dense',)}


@dataclass(frozen=True)
class Phase:
    """One phase ``[begin, end)`` of the schedule (``end=None``: to the end of training)."""

    kind: str
    begin: int
    end: Optional[int] = None

    @property
    def length(self) -> Optional[int]:
        """``end − begin``, or ``None`` for the open-ended final phase."""
        return None if self.end is None else self.end - self.begin


def ramp(x: float, c: float = 4.0) -> float:
    """Exponential ramp ``(1 − e^{−c·x}) / (1 − e^{−c})`` for ``x`` in [0, 1] (0 at 0, 1 at 1)."""
    x = min(max(x, 0.0), 1.0)
    return (1.0 - math.exp(-c * x)) / (1.0 - math.exp(-c))


def validate_phases(phases: Sequence[Phase]) -> None:
    """Raise ``ValueError`` unless ``phases`` is a valid contiguous schedule (see module docstring)."""
    if not phases:
        raise ValueError('the SA++ schedule needs at least one phase')
    for idx, phase in enumerate(phases):
        where = f'phase {idx} ({phase.kind} [{phase.begin}, {phase.end}))'
        if phase.kind not in PHASES:
            raise ValueError(f'{where}: unknown phase kind {phase.kind!r}; choose one of {PHASES}')
        if idx == 0 and phase.begin != 0:
            raise ValueError(f'{where}: the first phase must begin at 0')
        last = idx == len(phases) - 1
        if phase.end is None and not last:
            raise ValueError(f'{where}: only the last phase may be open-ended (end=None)')
        if phase.end is not None and phase.end <= phase.begin:
            raise ValueError(f'{where}: needs begin < end')
        if idx > 0:
            prev = phases[idx - 1]
            if phase.begin < prev.end:
                raise ValueError(f'overlapping phases: {where} begins before phase {idx - 1} '
                                 f'({prev.kind}) ends at {prev.end}')
            if phase.begin > prev.end:
                raise ValueError(f'gap between phases: phase {idx - 1} ends at {prev.end}, {where} '
                                 f'begins at {phase.begin}')
            if phase.kind not in _NEXT[prev.kind]:
                raise ValueError(f'{where} cannot follow a {prev.kind} phase; allowed after '
                                 f'{prev.kind}: {_NEXT[prev.kind]}')
    if phases[-1].kind != 'sparse':
        raise ValueError(f'the last phase must be the final sparse phase, got {phases[-1].kind!r}')


def parse_phases(phases: Sequence) -> List[Phase]:
    """Phases from config entries ``dict(type=..., begin=..., end=...)`` (last ``end`` optional)."""
    parsed = []
    for idx, entry in enumerate(phases):
        if isinstance(entry, Phase):
            parsed.append(entry)
            continue
        entry = dict(entry)
        unknown = set(entry) - {'type', 'begin', 'end'}
        if unknown or 'type' not in entry or 'begin' not in entry:
            raise ValueError(f'phase {idx} needs keys type, begin (and end); got {sorted(entry)}')
        parsed.append(Phase(entry['type'], int(entry['begin']),
                            None if entry.get('end') is None else int(entry['end'])))
    validate_phases(parsed)
    return parsed


def cyclic_phases(warmup: int, sparsify: int, sparse: int, dense: int, cycles: int) -> List[Phase]:
    """``dense warm-up → (sparsify → sparse → dense)^(cycles−1) → sparsify → final sparse``.

    ``warmup = 0`` drops the warm-up, ``sparsify = 0`` makes each pruning a step (ACDC, one-shot).
    """
    for name, value in dict(warmup=warmup, sparsify=sparsify, sparse=sparse, dense=dense).items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f'phase length {name} must be an integer >= 0, got {value!r}')
    if not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f'cycles must be an integer >= 1, got {cycles!r}')
    if cycles > 1 and (sparse == 0 or dense == 0):
        raise ValueError(f'{cycles} cycles need sparse > 0 and dense > 0 (intermediate SPARSE and '
                         f'DENSE phases), got sparse={sparse}, dense={dense}')
    phases, t = [], 0

    def add(kind: str, length: Optional[int]) -> None:
        nonlocal t
        phases.append(Phase(kind, t, None if length is None else t + length))
        t = t + (length or 0)

    if warmup:
        add('dense', warmup)
    for k in range(cycles):
        if sparsify:
            add('sparsify', sparsify)
        if k < cycles - 1:
            add('sparse', sparse)
            add('dense', dense)
        else:
            add('sparse', None)
    validate_phases(phases)
    return phases


class PhaseSchedule:
    """Phase and pruned share at any progress ``t`` (iteration), stateless.

    Args:
        phases (list[Phase]): A valid schedule in units of iterations.
        c (float): Ramp constant of SPARSIFICATION phases (the paper uses 2, 4 or 8).
            Defaults to 4.0.
        increments (int, optional): Number of pruning increments per SPARSIFICATION phase, evenly
            spread; ``None`` prunes at every iteration. Defaults to None.

    Note:
        Iteration ``t`` of a SPARSIFICATION phase ``[b, b + T)`` runs at the share
        ``s_target·ramp(q)`` with ``q = floor((t − b + 1)·K/T)/K`` (``K = T`` when ``increments`` is
        None), so the share reaches ``s_target`` in the phase's last iteration and the following SPARSE
        phase starts at the target.
    """

    def __init__(self, phases: Sequence[Phase], c: float = 4.0,
                 increments: Optional[int] = None) -> None:
        validate_phases(phases)
        if not c > 0:
            raise ValueError(f'ramp constant c must be > 0, got {c}')
        if increments is not None and (not isinstance(increments, int) or increments < 1):
            raise ValueError(f'increments must be a positive integer or None, got {increments!r}')
        self.phases = list(phases)
        self.c = float(c)
        self.increments = increments

    def phase_at(self, t: int) -> Tuple[int, Phase]:
        """Index and phase that iteration ``t`` belongs to."""
        if t < 0:
            raise ValueError(f'progress must be >= 0, got {t}')
        for idx, phase in enumerate(self.phases):
            if phase.end is None or t < phase.end:
                return idx, phase
        return len(self.phases) - 1, self.phases[-1]

    def level_at(self, t: int) -> float:
        """Pruned share at iteration ``t`` as a fraction of the target (0 dense, 1 sparse)."""
        _, phase = self.phase_at(t)
        if phase.kind == 'dense':
            return 0.0
        if phase.kind == 'sparse':
            return 1.0
        length = phase.length
        steps = self.increments or length
        q = math.floor((t - phase.begin + 1) * steps / length) / steps
        return ramp(q, self.c)

    def n_pruned(self, t: int, target: float, n_blocks: int) -> int:
        """Blocks pruned at iteration ``t`` in a layer of ``n_blocks`` with target share ``target``."""
        return min(n_blocks, int(math.floor(target * self.level_at(t) * n_blocks + 0.5)))

    def final_begin(self) -> int:
        """Progress at which the final SPARSE phase begins (its pruning may start before)."""
        return self.phases[-1].begin
