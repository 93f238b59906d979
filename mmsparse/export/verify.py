"""Verification of folded weights against their declared patterns, in a model or a checkpoint file."""
from typing import List, Mapping, Optional, Tuple

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor

from ..core.finite import NonFinite, find_nonfinite
from ..core.report import LayerStat, state_dict_report, verify_state_dict
from ..core.spec import FoldSpec, specs_from_meta, specs_from_patterns

FOLD_META_KEY = 'mmsparse_fold'


class PatternViolationError(ValueError):
    """Folded weights break the pattern their layer declares (or hold NaN/inf)."""

    def __init__(self, violations: list) -> None:
        self.violations = violations
        lines = '\n  '.join(str(v) for v in violations[:20])
        more = f'\n  ... and {len(violations) - 20} more' if len(violations) > 20 else ''
        nonfinite = sum(isinstance(v, NonFinite) for v in violations)
        broken = len(violations) - nonfinite
        heads = ([f'{nonfinite} tensor(s) hold NaN/inf'] if nonfinite else []) + (
            [f'{broken} layer part(s) break their declared pattern'] if broken else [])
        super().__init__(f'{"; ".join(heads)}:\n  {lines}{more}')


def verify_folded(state_dict: Mapping[str, Tensor], specs: Mapping[str, FoldSpec]) -> None:
    """Raise :class:`PatternViolationError` if any layer breaks its declared pattern."""
    violations = verify_state_dict(state_dict, specs)
    if violations:
        raise PatternViolationError(violations)


def checkpoint_specs(checkpoint: dict, path: str = 'checkpoint') -> Mapping[str, FoldSpec]:
    """``{layer: FoldSpec}`` recorded in the fold meta of a loaded checkpoint.

    Raises:
        ValueError: the checkpoint has no mmsparse fold meta.
    """
    meta = (checkpoint.get('meta') or {}).get(FOLD_META_KEY) if isinstance(checkpoint, dict) else None
    if not meta:
        raise ValueError(f'{path} has no {FOLD_META_KEY!r} meta: give the patterns to verify')
    return specs_from_meta(meta['layers'])


def load_plain_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no mmsparse allow-list: what stock tools see)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def verify_checkpoint(path: str, patterns: Optional[Mapping[str, str]] = None
                      ) -> Tuple[list, List[LayerStat]]:
    """Check a checkpoint against ``{layer: pattern}`` (default: the patterns in its fold meta).

    Checkpoints still carrying masks are checked on their stored ``weight`` tensors, i.e. as if they
    were folded: verify the output of :func:`~mmsparse.export.fold_checkpoint`, or give explicit
    patterns. Quantized layers are checked against the grid recorded in the fold meta. Every
    floating-point tensor is checked for NaN/inf; those holding some come first in the violations,
    as :class:`~mmsparse.core.NonFinite`.

    Returns:
        tuple: ``(violations, report rows)``.

    Raises:
        ValueError: no patterns given and the checkpoint has no mmsparse fold meta, or a quantized
            layer's pattern comes without its ``weight_scale``.
    """
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, dict) else checkpoint
    specs = checkpoint_specs(checkpoint, path) if patterns is None else specs_from_patterns(patterns)
    violations = find_nonfinite(state) + verify_state_dict(state, specs)
    return violations, state_dict_report(state, specs)


__all__ = ['FOLD_META_KEY', 'PatternViolationError', 'checkpoint_specs', 'load_plain_checkpoint',
           'verify_checkpoint', 'verify_folded']
