"""CGMQHook: MACs tracing and budget check, range calibration, BOPs logging, the budget guarantee."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset
from mmengine.dist import all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from .bops import (bit_histogram, check_budget_args, cgmq_layers, format_bops_report,
                   full_precision_bops, resolve_budget, total_bops, trace_macs, unwrap)
from .layers import CGMQMixin
from .quantizer import GATED_BITS


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
class CGMQHook(Hook):
    """Drive CGMQ training: budget, calibration, logging and the final budget guarantee.

    * ``before_run``: traces the MACs of every CGMQ layer at ``input_shape`` (and ``num_rois`` RoIs
      for RoI heads, see :mod:`mmsparse.cgmq.bops`), resolves the budget and fails with a clear
      message if it is below the all-2-bit model — before any checkpoint is loaded or step taken.
    * ``before_train`` (after pretrained weights / resumed checkpoints are loaded): calibrates the
      ranges of layers whose ``calibrated`` buffer is unset from ``calib_batches`` training batches
      (float forward, statistics averaged over batches and ranks), binds the optimizer wrapper and
      gives it the budget. On resume the buffers come from the checkpoint and calibration is skipped.
    * ``after_train_iter``: logs BOPs, budget and bit histogram (``train/cgmq_*`` scalars); after the
      last iteration, before the last checkpoint and validation, it enforces the budget: if BOPs are
      over it, :func:`greedy_reduction` switches gates off and every change is logged.
    * ``before_save_checkpoint``: verifies the budget and records BOPs, budget and per-layer bits
      in ``checkpoint['meta']['cgmq']`` (plain types); a mid-training checkpoint may be over budget
      (CGGD is in its feasibility phase) and is flagged with a warning.
    * ``after_train``: verifies the final model once more.

    Args:
        budget_relative (float, optional): Budget as a share of the 32/32-bit BOPs of the CGMQ
            layers, e.g. ``(4 * 4) / (32 * 32)``. Defaults to None.
        budget_gbops (float, optional): Absolute budget in GBOPs. Give exactly one of the two.
            Defaults to None.
        input_shape (tuple): ``(C, H, W)`` at which MACs are counted. Defaults to (3, 800, 1333).
        num_rois (int): RoIs for the RoI heads of two-stage detectors. Defaults to 512.
        calib_batches (int): Training batches for range calibration. Defaults to 4.
        interval (int): Log every ``interval`` iterations. Defaults to 50.
    """

    priority = 'NORMAL'

    def __init__(self, budget_relative: Optional[float] = None,
                 budget_gbops: Optional[float] = None,
                 input_shape: Sequence[int] = (3, 800, 1333), num_rois: int = 512,
                 calib_batches: int = 4, interval: int = 50) -> None:
        check_budget_args(budget_relative, budget_gbops)
        if len(input_shape) != 3:
            raise ValueError(f'input_shape must be (C, H, W), got {input_shape!r}')
        if num_rois < 1 or calib_batches < 0 or interval < 1:
            raise ValueError(f'need num_rois >= 1, calib_batches >= 0, interval >= 1; got '
                             f'{num_rois}, {calib_batches}, {interval}')
        self.budget_relative = budget_relative
        self.budget_gbops = budget_gbops
        self.input_shape = tuple(input_shape)
        self.num_rois = num_rois
        self.calib_batches = calib_batches
        self.interval = interval
        self.budget: Optional[int] = None
        self.full: Optional[int] = None
        self.trajectory: List[Tuple[int, int]] = []

    # -- helpers --------------------------------------------------------------------------------
    def _layers(self, runner):
        return cgmq_layers(runner.model)

    def _bops(self, runner) -> int:
        return total_bops(layer for _, layer in self._layers(runner))

    def _status(self, runner) -> str:
        bops = self._bops(runner)
        return (f'BOPs {bops / 1e9:.4f} G (relative {bops / self.full:.6f}) vs budget '
                f'{self.budget / 1e9:.4f} G (relative {self.budget / self.full:.6f}): '
                f'{"within" if bops <= self.budget else "OVER"} budget; bits {bit_histogram(runner.model)}')

    # -- stages ---------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        """Trace MACs and check that the budget is reachable."""
        trace_macs(runner.model, self.input_shape, self.num_rois)
        layers = [layer for _, layer in self._layers(runner)]
        self.full = full_precision_bops(layers)
        self.budget = resolve_budget(layers, self.budget_relative, self.budget_gbops)
        runner.logger.info(f'CGMQHook: {len(layers)} CGMQ layers, MACs traced at input '
                           f'{self.input_shape} ({self.num_rois} RoIs); budget '
                           f'{self.budget / 1e9:.4f} GBOPs = {self.budget / self.full:.6f} of 32/32')

    def _calib_batches(self, runner):
        """The first ``calib_batches`` batches of the training set, in order, in this process.

        A separate single-process loader: iterating the runner's (persistent-worker, infinite)
        loader would reset the training loop's iterator, and would consume training samples and
        random state.
        """
        loader = runner.train_dataloader
        batch_size = loader.batch_size or getattr(loader.batch_sampler, 'batch_size', 1)
        dataset = loader.dataset
        rank, world = get_dist_info()
        start = rank * batch_size * self.calib_batches
        indices = [i % len(dataset) for i in range(start, start + batch_size * self.calib_batches)]
        calib = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                           num_workers=0, collate_fn=loader.collate_fn)
        return iter(calib)

    @torch.no_grad()
    def calibrate(self, runner) -> int:
        """Initialise ranges of uncalibrated layers from training batches; return how many layers."""
        layers = [(n, l) for n, l in self._layers(runner) if not bool(l.calibrated)]
        if not layers:
            return 0
        model = unwrap(runner.model)
        modes = {m: m.training for m in model.modules()}
        for _, layer in layers:
            layer.start_observing()
        model.eval()
        try:
            for batch in self._calib_batches(runner):
                data = model.data_preprocessor(batch, False)
                model(**data, mode='tensor')
        finally:
            stats = [layer.stop_observing() for _, layer in layers]
            for m, mode in modes.items():
                m.training = mode
        for (name, layer), stat in zip(layers, stats):
            if stat is None:
                # not reached by the data (e.g. a branch unused here): weights only, act range 1
                layer.set_ranges(None, None)
                continue
            max_abs = stat['max_abs'].reshape(1).clone()
            minimum = stat['min'].reshape(1).clone()
            all_reduce(max_abs, op='mean')
            all_reduce(minimum, op='min')
            layer.set_ranges(max_abs, minimum)
        return len(layers)

    def before_train(self, runner) -> None:
        """Calibrate (fresh start only), bind the optimizer wrapper, log the starting point."""
        done = self.calibrate(runner) if self.calib_batches > 0 else 0
        if done:
            runner.logger.info(f'CGMQHook: calibrated ranges of {done} layers on '
                               f'{self.calib_batches} training batches')
        else:
            runner.logger.info('CGMQHook: ranges already calibrated (resume or CGMQ checkpoint); '
                               'calibration skipped')
            if self.calib_batches == 0:
                for _, layer in self._layers(runner):
                    if not bool(layer.calibrated):
                        layer.set_ranges(None, None)
        optim_wrapper = runner.optim_wrapper
        if hasattr(optim_wrapper, 'set_budget'):
            optim_wrapper.bind_model(unwrap(runner.model))
            optim_wrapper.set_budget(self.budget)
        else:
            runner.logger.warning(
                f'CGMQHook: optimizer wrapper {type(optim_wrapper).__name__} applies no constraint '
                'term; use CGMQOptimWrapper / CGMQAmpOptimWrapper. The budget is still enforced at '
                'the end by greedy bit reduction.')
        runner.logger.info(f'CGMQHook: start of training\n'
                           f'{format_bops_report(runner.model, self.budget)}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Log BOPs vs budget; enforce the budget after the last iteration."""
        last = runner.iter + 1 >= runner.max_iters
        bops = self._bops(runner)
        self.trajectory.append((runner.iter + 1, bops))
        if last:
            self.enforce_budget(runner)
            bops = self._bops(runner)
        if last or self.every_n_train_iters(runner, self.interval):
            hub = runner.message_hub
            hub.update_scalar('train/cgmq_bops_rel', bops / self.full)
            hub.update_scalar('train/cgmq_gbops', bops / 1e9)
            hub.update_scalar('train/cgmq_budget_rel', self.budget / self.full)
            hub.update_scalar('train/cgmq_over_budget', float(bops > self.budget))
            layers = [l for _, l in self._layers(runner)]
            hub.update_scalar('train/cgmq_mean_bits_w', sum(l.bits_w for l in layers) / len(layers))
            hub.update_scalar('train/cgmq_mean_bits_a', sum(l.bits_a for l in layers) / len(layers))
            runner.logger.info(f'CGMQHook iter {runner.iter + 1}: {self._status(runner)}')

    def enforce_budget(self, runner) -> List[dict]:
        """Apply the greedy bit reduction if over budget; log exactly what changed."""
        changes = greedy_reduction(self._layers(runner), self.budget)
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
        checkpoint.setdefault('meta', {})['cgmq'] = dict(
            bops=int(bops), budget=int(self.budget), full_bops=int(self.full),
            relative_bops=float(bops / self.full), within_budget=bool(within),
            bits={name: [int(l.bits_w), int(l.bits_a)] for name, l in self._layers(runner)})
        if not within:
            runner.logger.warning(f'CGMQHook: checkpoint at iter {runner.iter} is over budget '
                                  f'(training not finished): {self._status(runner)}')

    def after_train(self, runner) -> None:
        """Final verification of the guarantee."""
        bops = self._bops(runner)
        if bops > self.budget:
            raise RuntimeError(f'CGMQHook: final model over budget: {self._status(runner)}')
        runner.logger.info(f'CGMQHook: final model {self._status(runner)}\n'
                           f'{format_bops_report(runner.model, self.budget)}')
