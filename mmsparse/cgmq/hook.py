"""CGMQHook: MACs tracing and budget check, range calibration, BOPs logging, the budget guarantee."""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from mmengine.dist import all_reduce, get_dist_info
from mmengine.registry import HOOKS
from torch.utils.data import DataLoader, Subset

from ..core.finite import ADVICE_DIVERGED, ADVICE_LOADED, check_finite, layer_tensors
from ..engine.compression_hook import CompressionHook
from .bops import (bit_histogram, check_budget_args, format_bops_report, full_precision_bops,
                   resolve_budget, total_bops, trace_macs)
from .layers import CGMQMixin, cache_host_states, read_host_states
from .optim_wrapper import CGMQGradEdit
from .quantizer import GATED_BITS

# trained tensors checked for NaN/inf; the gates (read by every BOPs count) also after every step
_FINITE_STATE = ('weight', 'weight_range', 'act_range', 'weight_gate', 'act_gate')
_GATES = ('weight_gate', 'act_gate')


def greedy_reduction(layers: Sequence[Tuple[str, CGMQMixin]], budget: int) -> List[dict]:
    """Switch off top gates until BOPs ≤ budget; return the changes made, in order.

    Each step halves one tensor's bit width. If a single step reaches the budget, the step with the
    smallest BOPs reduction among those that do is taken (least precision lost); otherwise the step
    with the largest reduction (fewest steps). Ties go to the gate closest to switching off (smallest
    value), then to the layer name.
    """
    changes = []
    while True:
        bops = total_bops(layer for _, layer in layers)
        if bops <= budget:
            return changes
        options = []
        for name, layer in layers:
            tensors = [('weight', layer.weight_gate, layer.bits_w)]
            if layer.quant_act:
                tensors.append(('act', layer.act_gate, layer.bits_a))
            for kind, gate, bits in tensors:
                if bits <= 2:
                    continue
                other = layer.bits_a if kind == 'weight' else layer.bits_w
                saving = layer.macs * (bits - bits // 2) * other
                idx = GATED_BITS.index(bits)
                options.append((saving, float(gate.detach()[idx]), name, kind, gate, idx, bits))
        if not options:
            raise RuntimeError('CGMQ: every tensor is at 2 bits and BOPs still exceed the budget')
        enough = [o for o in options if bops - o[0] <= budget]
        if enough:
            choice = min(enough, key=lambda o: (o[0], o[1], o[2], o[3]))
        else:
            choice = min(options, key=lambda o: (-o[0], o[1], o[2], o[3]))
        saving, _, name, kind, gate, idx, bits = choice
        with torch.no_grad():
            value = float(gate.detach()[idx])
            gate[idx] = -abs(value) if value != 0 else -1e-3
        changes.append(dict(layer=name, tensor=kind, bits_from=bits, bits_to=bits // 2,
                            bops_before=bops, bops_after=bops - saving))


@HOOKS.register_module()
class CGMQHook(CompressionHook):
    """Drive CGMQ training: budget, calibration, logging and the final budget guarantee.

    * ``before_run``: traces the MACs of every CGMQ layer at ``input_shape`` (and ``num_rois`` RoIs
      for RoI heads, see :mod:`mmsparse.cgmq.bops`), resolves the budget and fails with a clear
      message if it is below the all-2-bit model — before any checkpoint is loaded or step taken.
    * ``after_load_checkpoint`` (resume / ``load_from``, before the state is copied in): checks
      that the checkpoint holds every CGMQ layer's gates, ranges and flags (MMEngine loads
      non-strictly, so missing or differently shaped keys would silently leave the defaults); see
      :meth:`after_load_checkpoint`.
    * ``before_train`` (after pretrained weights / resumed checkpoints are loaded): calibrates the
      ranges of layers whose ``calibrated`` buffer is unset from ``calib_batches`` global training
      batches (float forward; under DDP each rank sees its share of every global batch and the
      statistics are reduced across ranks, see :meth:`calibrate`), binds the optimizer wrapper and
      gives it the budget. On resume the buffers come from the checkpoint and calibration is skipped.
    * ``after_train_iter``: logs BOPs, budget and bit histogram (``train/cgmq_*`` scalars); after the
      last iteration, before the last checkpoint and validation, it enforces the budget: if BOPs are
      over it, :func:`greedy_reduction` switches gates off and every change is logged.
    * ``before_save_checkpoint``: verifies the budget and records BOPs, budget and per-layer bits
      in ``checkpoint['meta']['cgmq']`` (plain types); a mid-training checkpoint may be over budget
      (CGGD is in its feasibility phase) and is flagged with a warning.
    * ``after_train``: verifies the final model once more.

    Under DDP, after calibration and at every log interval, the gates, ranges and range flags of all
    ranks are compared bit-for-bit and a difference raises an error naming the tensors.

    NaN/inf (:func:`mmsparse.core.check_finite`, a ``FloatingPointError`` naming the tensor): weights,
    ranges and gates are checked in ``before_train`` before calibration (a NaN checkpoint is refused
    before the first iteration) and at every log interval and the last iteration; the gates, which
    every BOPs count reads, after every step.

    Args:
        budget_relative (float, optional): Budget as a share of the 32/32-bit BOPs of the CGMQ
            layers, e.g. ``(4 * 4) / (32 * 32)``. Defaults to None.
        budget_gbops (float, optional): Absolute budget in GBOPs. Give exactly one of the two.
            Defaults to None.
        input_shape (tuple): ``(C, H, W)`` at which MACs are counted. Defaults to (3, 800, 1333).
        num_rois (int): RoIs for the RoI heads of two-stage detectors. Defaults to 512.
        calib_batches (int): Global training batches for range calibration. Defaults to 4.
        interval (int): Log every ``interval`` iterations. Defaults to 50.
    """

    layer_type = CGMQMixin
    rank_state = ('weight_gate', 'act_gate', 'weight_range', 'act_range', 'act_signed', 'calibrated')
    wrapper_type = CGMQGradEdit
    wrapper_advice = ('use CGMQOptimWrapper / CGMQAmpOptimWrapper for the constraint term; the budget '
                      'is still enforced at the end by greedy bit reduction')

    def __init__(self, budget_relative: Optional[float] = None,
                 budget_gbops: Optional[float] = None,
                 input_shape: Sequence[int] = (3, 800, 1333), num_rois: int = 512,
                 calib_batches: int = 4, interval: int = 50) -> None:
        check_budget_args(budget_relative, budget_gbops)
        if len(input_shape) != 3:
            raise ValueError(f'input_shape must be (C, H, W), got {input_shape!r}')
        if num_rois < 1 or calib_batches < 0:
            raise ValueError(f'need num_rois >= 1, calib_batches >= 0; got {num_rois}, '
                             f'{calib_batches}')
        super().__init__(interval=interval)
        self.budget_relative = budget_relative
        self.budget_gbops = budget_gbops
        self.input_shape = tuple(input_shape)
        self.num_rois = num_rois
        self.calib_batches = calib_batches
        self.budget: Optional[int] = None
        self.full: Optional[int] = None
        self.trajectory: List[Tuple[int, int]] = []

    # -- helpers --------------------------------------------------------------------------------
    def _bops(self, runner) -> int:
        layers = [layer for _, layer in self.layers(runner)]
        read_host_states(layers)  # one synchronisation for the gates that changed (within a step)
        return total_bops(layers)

    def _check_finite(self, runner, attrs: Sequence[str], advice: str) -> None:
        """Raise ``FloatingPointError`` naming CGMQ layers whose ``attrs`` hold NaN/inf."""
        check_finite(type(self).__name__, layer_tensors(self.layers(runner), attrs), runner.iter,
                     advice)

    def _status(self, runner) -> str:
        bops = self._bops(runner)
        return (f'BOPs {bops / 1e9:.4f} G (relative {bops / self.full:.6f}) vs budget '
                f'{self.budget / 1e9:.4f} G (relative {self.budget / self.full:.6f}): '
                f'{"within" if bops <= self.budget else "OVER"} budget; bits {bit_histogram(runner.model)}')

    # -- stages ---------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        """Trace MACs and check that the budget is reachable."""
        trace_macs(runner.model, self.input_shape, self.num_rois)
        layers = [layer for _, layer in self.layers(runner)]
        self.full = full_precision_bops(layers)
        self.budget = resolve_budget(layers, self.budget_relative, self.budget_gbops)
        runner.logger.info(f'CGMQHook: {len(layers)} CGMQ layers, MACs traced at input '
                           f'{self.input_shape} ({self.num_rois} RoIs); budget '
                           f'{self.budget / 1e9:.4f} GBOPs = {self.budget / self.full:.6f} of 32/32')

    def _calib_batches(self, runner):
        """This rank's share of the first ``calib_batches`` global batches, in dataset order.

        Global batch ``b`` holds samples ``[b·B·W, (b+1)·B·W)`` (``B`` the per-rank batch size,
        ``W`` the world size) and rank ``r`` takes the ``r``-th ``B`` of them, so ``W`` processes
        together see exactly the batches one process with batch size ``B·W`` sees. A separate
        single-process loader: iterating the runner's (persistent-worker, infinite) loader would
        reset the training loop's iterator, and would consume training samples and random state.
        """
        loader = runner.train_dataloader
        batch_size = loader.batch_size or getattr(loader.batch_sampler, 'batch_size', 1)
        dataset = loader.dataset
        rank, world = get_dist_info()
        indices = [((b * world + rank) * batch_size + i) % len(dataset)
                   for b in range(self.calib_batches) for i in range(batch_size)]
        calib = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                           num_workers=0, collate_fn=loader.collate_fn)
        return iter(calib)

    @torch.no_grad()
    def calibrate(self, runner) -> int:
        """Initialise ranges of uncalibrated layers from training batches; return how many layers.

        Per layer and global batch the statistics are the input's max |x| and min x; ranks reduce
        them with max / min, so every rank gets the same ranges and, for a layer called once per
        forward, the same ones as a single process with the whole global batch. The activation
        range is the mean over batches of max |x|; the sign comes from the overall minimum.

        Note:
            A layer called several times per forward (a head shared by FPN levels) reports the mean
            over its calls of each call's max |x|; across ranks the max of those means is taken,
            which can be slightly below the single-process value with the same global batch.
        """
        layers = [(n, lay) for n, lay in self.layers(runner) if not bool(lay.calibrated)]
        if not layers:
            return 0
        model = self.model(runner)
        modes = {m: m.training for m in model.modules()}
        # -inf / +inf where this rank's forward did not reach a layer: neutral for max / min
        max_abs = torch.full((len(layers), self.calib_batches), -math.inf, dtype=torch.float64)
        minimum = torch.full_like(max_abs, math.inf)
        model.eval()
        try:
            for b, batch in enumerate(self._calib_batches(runner)):
                for _, layer in layers:
                    layer.start_observing()
                try:
                    data = model.data_preprocessor(batch, False)
                    model(**data, mode='tensor')
                finally:
                    stats = [layer.stop_observing() for _, layer in layers]
                for i, stat in enumerate(stats):
                    if stat is not None:
                        max_abs[i, b], minimum[i, b] = stat['max_abs'], stat['min']
        finally:
            for m, mode in modes.items():
                m.training = mode
        all_reduce(max_abs, op='max')
        all_reduce(minimum, op='min')
        for (_, layer), layer_max, layer_min in zip(layers, max_abs, minimum):
            reached = torch.isfinite(layer_max)
            if not reached.any():
                # not reached by the data on any rank (e.g. a branch unused here): weights only,
                # act range 1
                layer.set_ranges(None, None)
                continue
            layer.set_ranges(layer_max[reached].mean().float().view(1),
                             layer_min[reached].min().float().view(1))
        return len(layers)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Check that the CGMQ state of every layer is really loaded (MMEngine loads non-strictly).

        A layer's state is what :attr:`CGMQMixin.compression_state` lists (ranges, gates,
        ``act_signed``, ``calibrated``); a key counts as missing when the checkpoint lacks it or
        holds it in another shape (MMEngine skips it with a warning). On resume every key must be
        there: gates and ranges are trained state that nothing can recover. With ``load_from`` a
        layer may carry none of them (plain weights: gates start at the configured widths and
        ``before_train`` calibrates the ranges), but not only some: a ``calibrated`` flag without
        its ranges, say, would skip calibration and train from the default ranges.

        Raises:
            RuntimeError: naming the missing keys and what to do.
        """
        layers = self.layers(runner)
        missing = self.missing_state(checkpoint, layers)
        partial = [n for n, layer in layers
                   if 0 < len(missing.get(n, ())) < len(layer.compression_state)]
        plain = sum(len(missing.get(n, ())) == len(layer.compression_state) for n, layer in layers)
        missing = [f'{n}.{k}' for n, keys in missing.items() for k in keys]
        resuming = self.resuming(runner, checkpoint)
        if missing and (resuming or partial):
            if resuming:
                advice = ('resume needs a checkpoint of this CGMQ model (same layers and options); '
                          'to start CGMQ training from plain weights, use load_from instead of '
                          'resume (gates start at the configured bit widths, ranges are '
                          'calibrated)')
            else:
                advice = (f'{len(partial)} layers (e.g. {partial[:3]}) carry only part of it, a '
                          'CGMQ checkpoint of a differently configured model; fold it '
                          '(tools/fold.py) and load the folded checkpoint to start from its '
                          'weights')
            raise RuntimeError(
                f'CGMQHook: the checkpoint lacks the CGMQ state of {len(missing)} keys (missing or '
                f'of another shape), e.g. {missing[:5]}; {advice}')
        if plain:
            runner.logger.info(f'CGMQHook: checkpoint carries no CGMQ state for {plain} layers '
                               '(plain weights?); their gates start at the configured bit widths '
                               'and their ranges are calibrated in before_train')

    def before_train(self, runner) -> None:
        """Check for NaN/inf, calibrate (fresh start only), bind the optimizer wrapper, log."""
        self._check_finite(runner, _FINITE_STATE,
                           f'refusing to calibrate or train: {ADVICE_LOADED}')
        done = self.calibrate(runner) if self.calib_batches > 0 else 0
        if done:
            runner.logger.info(f'CGMQHook: calibrated ranges of {done} layers on '
                               f'{self.calib_batches} training batches')
        else:
            runner.logger.info('CGMQHook: ranges already calibrated (resume or CGMQ checkpoint); '
                               'calibration skipped')
            if self.calib_batches == 0:
                for _, layer in self.layers(runner):
                    if not bool(layer.calibrated):
                        layer.set_ranges(None, None)
        self.check_ranks(runner, 'after calibration / loading')
        wrapper = self.bind_optim_wrapper(runner)
        if wrapper is not None:
            wrapper.set_budget(self.budget)
        runner.logger.info(f'CGMQHook: start of training\n'
                           f'{format_bops_report(runner.model, self.budget)}')

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        """Read the gates of every layer for this step in one host synchronisation (the forward,
        the constraint term and the BOPs count then use these copies while the gates are unchanged)."""
        layers = [layer for _, layer in self.layers(runner)]
        cache_host_states(layers, True)
        read_host_states(layers)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Log BOPs vs budget; enforce the budget after the last iteration."""
        try:
            self._after_step(runner)
        finally:
            cache_host_states([layer for _, layer in self.layers(runner)], False)

    def _after_step(self, runner) -> None:
        last, logs = self.is_last(runner), self.logs_now(runner)
        self._check_finite(runner, _FINITE_STATE if logs else _GATES, ADVICE_DIVERGED)
        bops = self._bops(runner)
        self.trajectory.append((runner.iter + 1, bops))
        if last:
            self.enforce_budget(runner)
            bops = self._bops(runner)
        if logs:
            self.check_ranks(runner, f'at iteration {runner.iter + 1}')
            hub = runner.message_hub
            hub.update_scalar('train/cgmq_bops_rel', bops / self.full)
            hub.update_scalar('train/cgmq_gbops', bops / 1e9)
            hub.update_scalar('train/cgmq_budget_rel', self.budget / self.full)
            hub.update_scalar('train/cgmq_over_budget', float(bops > self.budget))
            layers = [lay for _, lay in self.layers(runner)]
            hub.update_scalar('train/cgmq_mean_bits_w', sum(lay.bits_w for lay in layers) / len(layers))
            hub.update_scalar('train/cgmq_mean_bits_a', sum(lay.bits_a for lay in layers) / len(layers))
            runner.logger.info(f'CGMQHook iter {runner.iter + 1}: {self._status(runner)}')

    def enforce_budget(self, runner) -> List[dict]:
        """Apply the greedy bit reduction if over budget; log exactly what changed."""
        changes = greedy_reduction(self.layers(runner), self.budget)
        if changes:
            lines = [f'  {c["layer"]}.{c["tensor"]}: {c["bits_from"]} -> {c["bits_to"]} bits, BOPs '
                     f'{c["bops_before"] / 1e9:.4f} G -> {c["bops_after"] / 1e9:.4f} G'
                     for c in changes]
            runner.logger.warning(f'CGMQHook: training ended over budget; greedy bit reduction '
                                  f'made {len(changes)} change(s):\n' + '\n'.join(lines))
        else:
            runner.logger.info('CGMQHook: final model within budget, no bit reduction needed')
        return changes

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """Verify the budget and record the bit widths in the checkpoint meta (plain types)."""
        if self.budget is None:
            return
        bops = self._bops(runner)
        within = bops <= self.budget
        meta = checkpoint.setdefault('meta', {})
        meta['cgmq'] = dict(
            bops=int(bops), budget=int(self.budget), full_bops=int(self.full),
            relative_bops=float(bops / self.full), within_budget=bool(within),
            bits={name: [int(lay.bits_w), int(lay.bits_a)] for name, lay in self.layers(runner)})
        if not within:
            # meta['iter'] counts the iterations done (runner.iter lags by one inside the loop)
            done = meta.get('iter', runner.iter)
            runner.logger.warning(f'CGMQHook: checkpoint at iter {done} is over budget (training '
                                  f'not finished): {self._status(runner)}')

    def after_train(self, runner) -> None:
        """Final verification of the guarantee."""
        bops = self._bops(runner)
        if bops > self.budget:
            raise RuntimeError(f'CGMQHook: final model over budget: {self._status(runner)}')
        runner.logger.info(f'CGMQHook: final model {self._status(runner)}\n'
                           f'{format_bops_report(runner.model, self.budget)}')
