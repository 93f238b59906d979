"""MaxQHook: drives the N:M masks of MaxQ, SR-STE and one-shot layers from the runner's progress."""
import math
from typing import List, Optional, Tuple

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ..core.report import format_report, model_report, overall_sparsity
from ..utils import differing_across_ranks
from .layers import NMSparseMixin
from .schedule import EXP_CURVATURE, preserve_rate, validate_schedule


@HOOKS.register_module()
class MaxQHook(Hook):
    """Set N:M masks from the preserve-rate schedule, log sparsity, fix the final masks.

    Masks are pure functions of (weights, progress): the mask used by iteration ``t + 1`` is computed
    in ``after_train_iter`` of iteration ``t`` (after the optimizer step), so checkpoints, validation
    and resume all see the mask that belongs to the saved weights. The first masks are computed in
    ``before_train``, after pretrained weights and resumed checkpoints are loaded. After the last
    iteration every mask is recomputed at preserve rate 0 (exact N:M), before the last checkpoint and
    validation.

    Args:
        schedule (str): Preserve-rate curve: ``'linear'``, ``'cubic'``, ``'cos'`` or ``'exp'``.
            Defaults to ``'cubic'``.
        start (int): Progress at which N:M blocks start to appear. Defaults to 0.
        end (int): Progress from which every block is N:M. ``start = end = 0`` means N:M from the
            first step (e.g. when fine-tuning an already N:M backbone). Defaults to 0.
        by_epoch (bool): Count ``start``/``end`` in epochs (the epoch of each iteration) rather than
            iterations. Defaults to False.
        exp_curvature (float): Curvature c of the ``'exp'`` curve over the normalised window,
            independent of its length and unit. Defaults to 1.45 (the MaxQ reference's shape).
        interval (int): Log sparsity and preserve rate every ``interval`` iterations. Defaults to 50.
        mask_interval (int): Recompute masks after every ``mask_interval``-th optimizer step (and
            always after the last). 1 is the exact method; larger values amortise the mask cost at
            the price of masks that lag the weights (an explicit approximation). Defaults to 1.
        exp_rate (float, optional): Removed (it was a rate per unit of progress, so the curve's
            shape depended on the window's length); giving it raises a ``ValueError`` that says
            which ``exp_curvature`` to use instead.

    Note:
        Pair it with :class:`NMSparseOptimWrapper` (or the AMP variant) for the SR-STE gradient decay.
    """

    priority = 'NORMAL'

    def __init__(self, schedule: str = 'cubic', start: int = 0, end: int = 0,
                 by_epoch: bool = False, exp_curvature: float = EXP_CURVATURE, interval: int = 50,
                 mask_interval: int = 1, exp_rate: Optional[float] = None) -> None:
        if exp_rate is not None:
            raise ValueError(
                f'MaxQHook: exp_rate={exp_rate!r} is no longer accepted: it was a rate per unit of '
                'progress, so on windows counted in iterations the exp curve collapsed to a step. '
                f'Use exp_curvature, the curvature over the whole window (default {EXP_CURVATURE}, '
                'the shape of the MaxQ reference code); the old value on this window is '
                f'exp_curvature = exp_rate * (end - start) = {exp_rate * (end - start):g}')
        validate_schedule(schedule, start, end, exp_curvature)
        if interval < 1 or mask_interval < 1:
            raise ValueError(f'interval and mask_interval must be >= 1, got {interval}, '
                             f'{mask_interval}')
        self.mask_interval = mask_interval
        self._masks_loaded = False
        self.schedule = schedule
        self.start = start
        self.end = end
        self.by_epoch = by_epoch
        self.exp_curvature = exp_curvature
        self.interval = interval

    # -- progress -------------------------------------------------------------------------------
    def _progress(self, runner, iteration: int) -> int:
        if not self.by_epoch:
            return iteration
        return iteration // len(runner.train_dataloader)

    def preserve_rate_at(self, runner, iteration: int) -> float:
        """Preserve rate used by training iteration ``iteration`` (0-based)."""
        return preserve_rate(self._progress(runner, iteration), self.start, self.end, self.schedule,
                             self.exp_curvature)

    def sparse_layers(self, runner) -> List[Tuple[str, NMSparseMixin]]:
        """All N:M layers of the runner's model, with names."""
        return [(n, m) for n, m in self._model(runner).named_modules()
                if isinstance(m, NMSparseMixin)]

    def _refresh(self, runner, preserve: float, first: bool = False) -> None:
        for name, layer in self.sparse_layers(runner):
            if first or layer.recompute_each_step:
                try:
                    layer.refresh_mask(preserve)
                except ValueError as err:  # the only one mask computation raises: NaN/inf weights
                    raise FloatingPointError(
                        f'MaxQHook: {name}.weight holds NaN or inf at iteration {runner.iter}; '
                        'refusing to compute an N:M mask from it') from err

    @staticmethod
    def _model(runner) -> nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    # -- stages ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        """Validate the set-up, bind the optimizer wrapper and compute the first masks."""
        self._check_window(runner)
        layers = self.sparse_layers(runner)
        if not layers:
            raise RuntimeError('MaxQHook found no N:M layer in the model: set conv_cfg to a MaxQ / '
                               'SR-STE / one-shot layer type or use ConvertedModel')
        optim_wrapper = runner.optim_wrapper
        if hasattr(optim_wrapper, 'bind_model'):
            bound = optim_wrapper.bind_model(self._model(runner))
            runner.logger.info(f'MaxQHook: {type(optim_wrapper).__name__} edits {bound} N:M layers '
                               f'(decay={getattr(optim_wrapper, "decay", None)})')
        else:
            runner.logger.warning(
                f'MaxQHook: optimizer wrapper {type(optim_wrapper).__name__} applies no N:M gradient '
                'edit; use NMSparseOptimWrapper / NMSparseAmpOptimWrapper for the SR-STE decay')
        if not (runner.iter > 0 and self._masks_loaded):
            # Fresh start (or a resumed checkpoint without masks): masks from the loaded weights.
            # On resume the checkpoint's masks are exactly those of the uninterrupted run.
            self._refresh(runner, self.preserve_rate_at(runner, runner.iter), first=True)
        runner.logger.info(
            f'MaxQHook: {self.schedule} preserve-rate schedule from {self.start} to {self.end} '
            f'{"epochs" if self.by_epoch else "iterations"}; preserve rate now '
            f'{self.preserve_rate_at(runner, runner.iter):.4f}\n'
            f'N:M sparsity at start of training:\n{format_report(model_report(self._model(runner)))}')

    def _check_window(self, runner) -> None:
        """Refuse a window that ends after training: the last step would jump to p = 0 unannounced.

        ``end`` equal to the training length is valid: the schedule reaches 0 exactly at the end.
        """
        if self.by_epoch:
            # epochs the iterations span (max_epochs of an epoch-based loop; an iteration-based
            # loop reports max_epochs = 1 whatever the length of its dataloader)
            total = math.ceil(runner.max_iters / len(runner.train_dataloader))
            unit, length = 'epochs', f'{total} epochs ({runner.max_iters} iterations)'
        else:
            total, unit = runner.max_iters, 'iterations'
            length = f'max_iters={total}'
        if self.end > total:
            raise ValueError(
                f'MaxQHook: the preserve-rate window start={self.start}, end={self.end} {unit} '
                f'ends after training ({length}): every mask would jump to full N:M sparsity at '
                f'the last step; set end <= {total} (and start <= end) or train longer')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Compute the masks for the next iteration (p = 0 after the last) and log."""
        nxt = runner.iter + 1
        last = nxt >= runner.max_iters
        preserve = 0.0 if last else self.preserve_rate_at(runner, nxt)
        if last or nxt % self.mask_interval == 0:
            self._refresh(runner, preserve)
        if last or self.every_n_train_iters(runner, self.interval):
            self._check_ranks(runner)
            stats = [s for s in model_report(self._model(runner)) if s.max_nnz is not None]
            runner.message_hub.update_scalar('train/nm_preserve_rate', preserve)
            runner.message_hub.update_scalar('train/nm_sparsity', overall_sparsity(stats))
        if last:
            runner.logger.info('MaxQHook: final masks fixed at preserve rate 0\n'
                               f'{format_report(model_report(self._model(runner)))}')

    def _check_ranks(self, runner) -> None:
        """Under DDP, fail loudly if the ranks' masks differ (they are pure functions of the weights)."""
        differ = differing_across_ranks(
            (f'{name}.mask', layer.mask) for name, layer in self.sparse_layers(runner))
        if differ:
            raise RuntimeError(f'MaxQHook: N:M masks differ across ranks at iteration {runner.iter}: '
                               f'{len(differ)} layers, e.g. {differ[:5]}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Check that mask buffers were really loaded (MMEngine loads non-strictly)."""
        state = checkpoint.get('state_dict', checkpoint)
        missing = [name for name, layer in self.sparse_layers(runner)
                   if layer.is_sparse and f'{name}.mask' not in state]
        self._masks_loaded = not missing
        if not missing:
            return
        oneshot = [n for n, lay in self.sparse_layers(runner) if n in missing and not lay.recompute_each_step]
        # This hook runs inside Runner.resume before the iteration is restored (runner.iter is
        # still 0): a resume is told by the runner's flag and the checkpoint's own iteration.
        resuming = getattr(runner, '_resume', False) and (checkpoint.get('meta') or {}).get('iter', 0) > 0
        if oneshot and resuming:
            raise RuntimeError(f'resumed checkpoint has no one-shot mask for {oneshot[:3]}...; the '
                               'fixed mask cannot be recovered from the weights')
        runner.logger.info(f'MaxQHook: checkpoint carries no mask for {len(missing)} N:M layers '
                           '(dense pretrained weights?); masks are computed from the weights')
