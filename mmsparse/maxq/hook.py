"""MaxQHook: drives the N:M masks of MaxQ, SR-STE and one-shot layers from the runner's progress."""
from typing import List, Optional, Tuple

from mmengine.registry import HOOKS

from ..core.finite import check_finite, layer_tensors
from ..core.masks import mask_kernel_applies
from ..core.report import format_report, model_report, overall_sparsity
from ..engine.compression_hook import CompressionHook
from .layers import NMSparseMixin
from .optim_wrapper import NMGradEdit
from .schedule import EXP_CURVATURE, preserve_rate, validate_schedule


@HOOKS.register_module()
class MaxQHook(CompressionHook):
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
        by_epoch (bool): Count ``start``/``end`` in epochs, each ``len(train_dataloader)``
            iterations; the preserve rate still changes every iteration. Defaults to False.
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

    layer_type = NMSparseMixin
    rank_state = ('mask',)
    wrapper_type = NMGradEdit
    wrapper_advice = 'use NMSparseOptimWrapper / NMSparseAmpOptimWrapper for the SR-STE decay'

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
        if not isinstance(mask_interval, int) or mask_interval < 1:
            raise ValueError(f'mask_interval must be an integer >= 1, got {mask_interval!r}')
        super().__init__(by_epoch, interval)
        self.mask_interval = mask_interval
        self._masks_loaded = False
        self.schedule = schedule
        self.start = start
        self.end = end
        self.exp_curvature = exp_curvature

    # -- progress -------------------------------------------------------------------------------
    def preserve_rate_at(self, runner, iteration: int) -> float:
        """Preserve rate used by training iteration ``iteration`` (0-based)."""
        return preserve_rate(iteration, self.iterations(runner, self.start),
                             self.iterations(runner, self.end), self.schedule, self.exp_curvature)

    def sparse_layers(self, runner) -> List[Tuple[str, NMSparseMixin]]:
        """The N:M layers of the runner's model that carry the pattern, with names."""
        return [(n, m) for n, m in self.layers(runner) if m.is_sparse]

    def _refresh(self, runner, preserve: float, first: bool = False) -> None:
        due = [(name, layer) for name, layer in self.sparse_layers(runner)
               if (first or layer.recompute_each_step) and not layer.mask_is_current(preserve)]
        # The compiled CPU kernel checks its weight as it reads it; the weights of the tensor-op
        # path (GPU) are checked here for all layers with one host synchronisation.
        kernel = {name: mask_kernel_applies(layer.weight, layer.pattern.m) for name, layer in due}
        tensor_path = [(name, layer) for name, layer in due if not kernel[name]]
        check_finite('MaxQHook', layer_tensors(tensor_path), runner.iter,
                     'refusing to compute an N:M mask from it')
        for name, layer in due:
            try:
                layer.refresh_mask(preserve, checked=not kernel[name])
            except ValueError as err:  # the only one mask computation raises: NaN/inf weights
                raise FloatingPointError(
                    f'MaxQHook: {name}.weight holds NaN or inf at iteration {runner.iter}; '
                    'refusing to compute an N:M mask from it') from err

    # -- stages ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        """Validate the set-up, bind the optimizer wrapper and compute the first masks."""
        self.check_window(runner, f'preserve-rate window start={self.start}, end={self.end} '
                          f'{self.unit}', self.end,
                          'every mask would jump to full N:M sparsity at the last step')
        if not self.layers(runner):
            raise RuntimeError('MaxQHook found no N:M layer in the model: set conv_cfg to a MaxQ / '
                               'SR-STE / one-shot layer type or use ConvertedModel')
        wrapper = self.bind_optim_wrapper(runner)
        if wrapper is not None:
            runner.logger.info(f'MaxQHook: SR-STE decay {wrapper.decay}')
        if not (runner.iter > 0 and self._masks_loaded):
            # Fresh start (or a resumed checkpoint without masks): masks from the loaded weights.
            # On resume the checkpoint's masks are exactly those of the uninterrupted run.
            self._refresh(runner, self.preserve_rate_at(runner, runner.iter), first=True)
        runner.logger.info(
            f'MaxQHook: {self.schedule} preserve-rate schedule from {self.start} to {self.end} '
            f'{self.unit}; preserve rate now '
            f'{self.preserve_rate_at(runner, runner.iter):.4f}\n'
            f'N:M sparsity at start of training:\n{format_report(model_report(self.model(runner)))}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Compute the masks for the next iteration (p = 0 after the last) and log."""
        nxt, last = runner.iter + 1, self.is_last(runner)
        preserve = 0.0 if last else self.preserve_rate_at(runner, nxt)
        if last or nxt % self.mask_interval == 0:
            self._refresh(runner, preserve)
        if self.logs_now(runner):
            self.check_ranks(runner, f'at iteration {nxt}', self.sparse_layers(runner))
            stats = [s for s in model_report(self.model(runner)) if s.max_nnz is not None]
            runner.message_hub.update_scalar('train/nm_preserve_rate', preserve)
            runner.message_hub.update_scalar('train/nm_sparsity', overall_sparsity(stats))
        if last:
            runner.logger.info('MaxQHook: final masks fixed at preserve rate 0\n'
                               f'{format_report(model_report(self.model(runner)))}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Check that mask buffers were really loaded (MMEngine loads non-strictly)."""
        missing = self.missing_state(checkpoint, self.sparse_layers(runner))
        self._masks_loaded = not missing
        if not missing:
            return
        oneshot = [n for n, layer in self.sparse_layers(runner)
                   if n in missing and not layer.recompute_each_step]
        if oneshot and self.resuming(runner, checkpoint):
            raise RuntimeError(f'resumed checkpoint has no one-shot mask for {oneshot[:3]}...; the '
                               'fixed mask cannot be recovered from the weights')
        runner.logger.info(f'MaxQHook: checkpoint carries no mask for {len(missing)} N:M layers '
                           '(dense pretrained weights?); masks are computed from the weights')
