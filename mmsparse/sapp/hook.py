"""SequentialAttentionHook: drives the block supports of SA++, ACDC and one-shot layers from progress."""
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.registry import HOOKS
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ..core.finite import ADVICE_DIVERGED, ADVICE_LOADED, check_finite, finite_loss, layer_tensors
from ..core.report import format_report, model_report
from ..engine.compression_hook import CompressionHook
from .layers import BlockSparseMixin
from .schedule import PHASE_CODES, Phase, PhaseSchedule, cyclic_phases, parse_phases


def _check_sparsity(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f'{what} must be a number in (0, 1), got {value!r}')
    return float(value)


@HOOKS.register_module()
class SequentialAttentionHook(CompressionHook):
    """Phase machine of SequentialAttention++ (and of the ACDC / one-shot baselines).

    The phase of every iteration is a pure function of the progress (see :mod:`.schedule`); the
    support of each layer is path-dependent (blocks pruned at earlier increments stay pruned until the
    next DENSE phase) and lives in the layers' persistent ``support`` buffers, so checkpoints carry it
    and resume is exact. Like :class:`~mmsparse.maxq.MaxQHook`, the state used by iteration ``t + 1``
    is set in ``after_train_iter`` of iteration ``t`` (after the optimizer step, before checkpointing),
    and the first state in ``before_train`` (after pretrained weights / resumed checkpoints load).
    Setting the state for iteration ``t`` means:

    * DENSE: release the support; weights of revived blocks restart from 0 and their optimizer state
      (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, …) is zeroed;
    * SPARSIFICATION / SPARSE: prune the lowest-score surviving blocks until the layer's pruned
      count matches ``target·level(t)``, then zero the pruned weights (hard pruning, re-applied after
      every step so momentum and weight decay cannot move them); logits frozen in SPARSE phases.

    Every step is idempotent given the support, which is what makes a resumed run identical.

    The weights and logits of every layer of these methods (dense-by-rule and frozen ones included)
    are checked for NaN/inf in ``before_train`` (after checkpoint loading), at every log interval and
    the last iteration, and after any step whose loss is not finite (the per-step test reads one
    scalar; a full pass over the weights costs tens of ms per step on CPU); a bad tensor stops
    training with a ``FloatingPointError`` naming it (:func:`mmsparse.core.check_finite`).

    Args:
        sparsity (float): Target share of pruned blocks per layer, in (0, 1). Defaults to 0.9.
        sparsity_overrides (dict, optional): ``{regex: sparsity}`` per-layer targets; the first
            pattern (in order) that fully matches a layer name wins. Defaults to None.
        phases (list[dict], optional): Explicit schedule, ``dict(type='dense'|'sparsify'|'sparse',
            begin=..., end=...)``, contiguous from 0, the last one ``sparse`` with ``end`` omitted.
            Exclusive with the compact arguments below. Defaults to None.
        warmup (int): Dense warm-up length. Defaults to 0.
        sparsify (int): Length of each SPARSIFICATION phase; 0 prunes in one step (ACDC, one-shot).
            Defaults to 0.
        sparse (int): Length of each intermediate SPARSE phase. Defaults to 0.
        dense (int): Length of each intermediate DENSE phase. Defaults to 0.
        cycles (int): Number of pruning phases; the last SPARSE phase runs to the end of training.
            ``warmup=0, sparsify=0, cycles=1`` is one-shot pruning at the start. Defaults to 1.
        c (float): Ramp constant of SPARSIFICATION phases. Defaults to 4.0.
        increments (int, optional): Pruning increments per SPARSIFICATION phase; None prunes at
            every iteration. Defaults to None.
        by_epoch (bool): Phase lengths in epochs, each ``len(train_dataloader)`` iterations; the
            ramp still advances every iteration. Defaults to False.
        interval (int): Log every ``interval`` iterations. Defaults to 50.

    Note:
        Logs ``train/sapp_phase`` (0 dense, 1 sparsify, 2 sparse), ``train/sapp_level`` (share of the
        target reached), ``train/sapp_block_sparsity`` (pruned share of all blocks of block-sparse
        layers) and ``train/sapp_attn_entropy`` (mean over SA++ layers of the attention entropy over
        surviving blocks, normalised to [0, 1]).

    Note:
        Under DDP every rank computes the same supports from the same (all-reduced) weights and
        logits; at each log interval the hook compares the supports and logits of all ranks
        bit-for-bit and raises if they differ. SA++ needs DDP's ``find_unused_parameters=True``
        (logits get no gradient in SPARSE phases, which plain DDP rejects at the next step); this
        is checked in ``before_train``.
    """

    layer_type = BlockSparseMixin
    rank_state = ('support', 'block_logits')

    def __init__(self, sparsity: float = 0.9, sparsity_overrides: Optional[Dict[str, float]] = None,
                 phases: Optional[Sequence[dict]] = None, warmup: int = 0, sparsify: int = 0,
                 sparse: int = 0, dense: int = 0, cycles: int = 1, c: float = 4.0,
                 increments: Optional[int] = None, by_epoch: bool = False,
                 interval: int = 50) -> None:
        self.sparsity = _check_sparsity(sparsity, 'sparsity')
        self.sparsity_overrides = {
            pattern: _check_sparsity(value, f'sparsity_overrides[{pattern!r}]')
            for pattern, value in (sparsity_overrides or {}).items()}
        for pattern in self.sparsity_overrides:
            re.compile(pattern)
        if phases is not None:
            if warmup or sparsify or sparse or dense or cycles != 1:
                raise ValueError('give either phases=[...] or the compact warmup/sparsify/sparse/'
                                 'dense/cycles arguments, not both')
            self.phases: List[Phase] = parse_phases(phases)
        else:
            self.phases = cyclic_phases(warmup, sparsify, sparse, dense, cycles)
        # validates c and increments on the configured units
        PhaseSchedule(self.phases, c, increments)
        super().__init__(by_epoch, interval)
        self.c = c
        self.increments = increments
        self.schedule: Optional[PhaseSchedule] = None
        self.targets: Dict[str, float] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def block_layers(self, runner) -> List[Tuple[str, BlockSparseMixin]]:
        """The trainable block-sparse layers of the runner's model, with names.

        Dense-by-rule layers and frozen ones (``weight.requires_grad`` False, e.g. mmdet's
        ``frozen_stages``) are excluded: a frozen layer can neither train its attention nor regrow
        revived weights, so it is left unpruned (all blocks kept).
        """
        return [(n, m) for n, m in self.layers(runner) if m.is_sparse and m.weight.requires_grad]

    def frozen_layers(self, runner) -> List[str]:
        """Names of block-sparse layers left unpruned because their weight is frozen."""
        return [n for n, m in self.layers(runner) if m.is_sparse and not m.weight.requires_grad]

    def target_for(self, name: str) -> float:
        """Target block sparsity of layer ``name``."""
        for pattern, value in self.sparsity_overrides.items():
            if re.fullmatch(pattern, name):
                return value
        return self.sparsity

    def _iteration_schedule(self, runner) -> PhaseSchedule:
        phases = [Phase(p.kind, self.iterations(runner, p.begin),
                        None if p.end is None else self.iterations(runner, p.end))
                  for p in self.phases]
        return PhaseSchedule(phases, self.c, self.increments)

    @staticmethod
    def _optimizers(runner) -> list:
        wrapper = runner.optim_wrapper
        if hasattr(wrapper, 'optimizer'):
            return [wrapper.optimizer]
        return [w.optimizer for w in wrapper.values()]  # OptimWrapperDict

    @staticmethod
    @torch.no_grad()
    def reset_optimizer_state(optimizers, param: Tensor, revived: Tensor) -> int:
        """Zero the per-element optimizer state of ``param`` at ``revived``; return tensors touched."""
        touched = 0
        for optimizer in optimizers:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value.masked_fill_(revived, 0)
                    touched += 1
        return touched

    def label(self, runner) -> str:
        """The method name for messages: SA++ when any layer selects by attention."""
        layers = [layer for _, layer in self.block_layers(runner)]
        return 'SA++' if any(layer.uses_attention for layer in layers) else 'ACDC/one-shot block'

    def _check_finite(self, runner, advice: str) -> None:
        """Raise ``FloatingPointError`` naming layers with NaN/inf weights or logits."""
        check_finite(type(self).__name__,
                     layer_tensors(self.layers(runner), ('weight', 'block_logits')),
                     runner.iter, advice)

    def _no_layer_message(self, runner) -> str:
        """Why :meth:`block_layers` is empty: no block-sparse layer, or all dense / frozen."""
        present = self.layers(runner)
        if not present:
            return ('SequentialAttentionHook found no block-sparse layer: set conv_cfg to '
                    'SAPPConv2d / MagnitudeBlockConv2d or use ConvertedModel')
        types = '/'.join(sorted({type(m).__name__ for _, m in present}))
        dense = [(n, m.dense_reason) for n, m in present if not m.is_sparse]
        frozen = self.frozen_layers(runner)
        causes, hints = [], []
        if dense:
            examples = '; '.join(f'{n}: {reason}' for n, reason in dense[:3])
            more = '; ...' if len(dense) > 3 else ''
            causes.append(f'{len(dense)} stayed dense ({examples}{more})')
            hints.append('a layer is tiled only when both sides of its 2-D weight view '
                         '(O x kh*kw*I) are multiples of block_size and it has at least min_blocks '
                         'blocks: choose a block_size that divides the layer dims (e.g. 8 or 16) or '
                         'lower min_blocks')
        if frozen:
            more = ', ...' if len(frozen) > 3 else ''
            causes.append(f'{len(frozen)} are frozen ({", ".join(frozen[:3])}{more})')
            hints.append('frozen layers (requires_grad=False, e.g. frozen_stages) stay unpruned')
        return (f'SequentialAttentionHook: the model has {len(present)} {types} layers but none can '
                f'be pruned: {" and ".join(causes)}; {"; ".join(hints)}')

    def _check_ddp(self, runner) -> None:
        """SA++ logits get no gradient in SPARSE phases; plain DDP then fails at the next step."""
        model = runner.model
        if (isinstance(model, DistributedDataParallel) and not model.find_unused_parameters
                and any(layer.uses_attention for _, layer in self.block_layers(runner))):
            raise ValueError(
                'SequentialAttentionHook: SA++ block logits are frozen (receive no gradient) in '
                'SPARSE phases, which DistributedDataParallel only allows with unused-parameter '
                'detection: set find_unused_parameters = True in the config (inside '
                'model_wrapper_cfg when the config has one), or pass --cfg-options '
                'model_wrapper_cfg.find_unused_parameters=True')

    # -- the phase machine ------------------------------------------------------------------------
    def apply(self, runner, t: int) -> Phase:
        """Set every layer's support, weights and logit freezing for iteration ``t``."""
        _, phase = self.schedule.phase_at(t)
        optimizers = None
        for name, layer in self.block_layers(runner):
            layer.logits_frozen = phase.kind == 'sparse'
            # weights pruned during the step just taken stay exactly 0 (momentum, weight decay)
            layer.apply_support()
            if phase.kind == 'dense':
                if layer.n_pruned:  # (a cached count: no host synchronisation per layer and step)
                    revived = layer.release()
                    optimizers = optimizers if optimizers is not None else self._optimizers(runner)
                    self.reset_optimizer_state(optimizers, layer.weight, revived)
            else:
                layer.prune_to(self.schedule.n_pruned(t, self.targets[name], layer.n_blocks))
        return phase

    def log(self, runner, t: int) -> None:
        """Write phase, level, block sparsity and attention entropy to the message hub."""
        layers = [layer for _, layer in self.block_layers(runner)]
        _, phase = self.schedule.phase_at(t)
        pruned = sum(layer.n_pruned for layer in layers)
        total = sum(layer.n_blocks for layer in layers)
        entropies = [layer.attention_entropy() for layer in layers if layer.uses_attention]
        hub = runner.message_hub
        hub.update_scalar('train/sapp_phase', PHASE_CODES[phase.kind])
        hub.update_scalar('train/sapp_level', self.schedule.level_at(t))
        hub.update_scalar('train/sapp_block_sparsity', pruned / max(total, 1))
        if entropies:
            hub.update_scalar('train/sapp_attn_entropy', sum(entropies) / len(entropies))

    # -- stages ---------------------------------------------------------------------------------
    def before_train(self, runner) -> None:
        """Check the set-up, resolve per-layer targets and set the state of the first iteration."""
        layers = self.block_layers(runner)
        if not layers:
            raise RuntimeError(self._no_layer_message(runner))
        names = [n for n, _ in layers]
        unused = [p for p in self.sparsity_overrides if not any(re.fullmatch(p, n) for n in names)]
        if unused:
            raise ValueError(f'sparsity_overrides patterns {unused} match no block-sparse layer')
        self.targets = {name: self.target_for(name) for name in names}
        self.schedule = self._iteration_schedule(runner)
        final = self.schedule.final_begin()
        if final >= runner.max_iters:
            raise ValueError(f'SequentialAttentionHook: the final sparse phase begins at iteration '
                             f'{final} but training ends at {runner.max_iters}: the model would not '
                             'end sparse; shorten the phases or train longer')
        self._check_ddp(runner)
        frozen = self.frozen_layers(runner)
        if frozen:
            runner.logger.warning(f'SequentialAttentionHook: {len(frozen)} frozen block-sparse layers '
                                  f'stay unpruned (requires_grad=False): {frozen}')
        self._check_finite(runner, f'refusing to select blocks: {ADVICE_LOADED}')
        phase = self.apply(runner, runner.iter)
        self.check_ranks(runner, f'at the start (iteration {runner.iter})', layers)
        runner.logger.info(
            f'SequentialAttentionHook: phases ({self.unit}): ' +
            ', '.join(f'{p.kind}[{p.begin},{"end" if p.end is None else p.end})'
                      for p in self.phases) +
            f'; c={self.c}; {len(layers)} block-sparse layers; now {phase.kind} at iteration '
            f'{runner.iter}\n{format_report(model_report(self.model(runner)))}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        """Set the state of the next iteration (the final sparse one after the last) and log."""
        nxt, last, logs = runner.iter + 1, self.is_last(runner), self.logs_now(runner)
        if logs or not finite_loss(outputs):
            self._check_finite(runner, ADVICE_DIVERGED)
        self.apply(runner, nxt)
        if logs:
            self.check_ranks(runner, f'at iteration {nxt}', self.block_layers(runner))
            self.log(runner, nxt)
        if last:
            layers = self.block_layers(runner)
            pruned = sum(layer.n_pruned for _, layer in layers)
            total = sum(layer.n_blocks for _, layer in layers)
            runner.logger.info(
                f'SequentialAttentionHook: final block sparsity {pruned / total:.4f} '
                f'({pruned}/{total} blocks of {len(layers)} layers)\n'
                f'{format_report(model_report(self.model(runner)))}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Check that supports (and logits) were really loaded (MMEngine loads non-strictly)."""
        missing = self.missing_state(checkpoint, self.block_layers(runner))
        if not missing:
            return
        if self.resuming(runner, checkpoint):
            no_support = [n for n, keys in missing.items() if 'support' in keys]
            no_logits = [n for n, keys in missing.items() if 'block_logits' in keys]
            raise RuntimeError(
                f'resumed checkpoint has no block support for {len(no_support)} layers '
                f'({no_support[:3]}) and no block logits for {len(no_logits)} layers '
                f'({no_logits[:3]}): the support is path-dependent and the attention is trained '
                'state, neither can be recovered')
        runner.logger.info(f'SequentialAttentionHook: checkpoint carries no block support or logits '
                           f'for {len(missing)} layers (dense pretrained weights?); all blocks start '
                           'kept, logits at 0')
