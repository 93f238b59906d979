"""CompressionHook: what the method hooks (MaxQ, SA++, CGMQ) share.

One base owns the runner plumbing every method needs, so each hook only states its method:

* the method's layers in the unwrapped (DDP / MMEngine wrapper) model, by :attr:`layer_type`;
* progress: with ``by_epoch`` every schedule point is a number of epochs, converted to iterations
  with the train loader's length (:meth:`iterations`); schedules always run on the iteration;
* schedule windows checked against the training length before the first step (:meth:`check_window`);
* the rank-agreement check over the declared per-layer :attr:`rank_state` (:meth:`check_ranks`);
* which of the declared :attr:`compression_state` a loaded checkpoint lacks, and whether the load is a
  resume (:meth:`missing_state`, :meth:`resuming`);
* binding the optimizer wrapper that implements the method's gradient edit (:attr:`wrapper_type`).
"""
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

from mmengine.hooks import Hook
from torch import nn

from ..utils import differing_across_ranks, unwrap
from .grad_edit import GradEditMixin


class CompressionHook(Hook):
    """Base of the method hooks.

    Subclasses set :attr:`layer_type` (the method's layer mixin), :attr:`rank_state` (per-layer
    tensors every DDP rank must hold bit for bit), :attr:`wrapper_type` (the optimizer-wrapper
    interface applying the method's gradient edit) with :attr:`wrapper_advice` (which wrapper to
    use when another one is configured).

    Args:
        by_epoch (bool): Count schedule points in epochs (each is ``len(train_dataloader)``
            iterations) rather than iterations. Defaults to False.
        interval (int): Log (and check the ranks) every ``interval`` iterations. Defaults to 50.
    """

    priority = 'NORMAL'
    layer_type: ClassVar[Type[nn.Module]] = nn.Module
    rank_state: ClassVar[Tuple[str, ...]] = ()
    wrapper_type: ClassVar[Optional[Type[GradEditMixin]]] = None
    wrapper_advice: ClassVar[str] = ''

    def __init__(self, by_epoch: bool = False, interval: int = 50) -> None:
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f'{type(self).__name__}: interval must be an integer >= 1, got '
                             f'{interval!r}')
        self.by_epoch = by_epoch
        self.interval = interval

    # -- model and layers -----------------------------------------------------------------------
    @staticmethod
    def model(runner) -> nn.Module:
        """The runner's model without its wrapper."""
        return unwrap(runner.model)

    def layers(self, runner) -> List[Tuple[str, nn.Module]]:
        """Every layer of the method (:attr:`layer_type`) with its name."""
        return [(n, m) for n, m in self.model(runner).named_modules() if isinstance(m, self.layer_type)]

    # -- progress -------------------------------------------------------------------------------
    @property
    def unit(self) -> str:
        """The unit of the schedule's points."""
        return 'epochs' if self.by_epoch else 'iterations'

    def iterations(self, runner, value: float) -> int:
        """Schedule point ``value`` (in :attr:`unit`) as an iteration count."""
        if not self.by_epoch:
            return int(value)
        return int(round(value * len(runner.train_dataloader)))

    def check_window(self, runner, window: str, end: float, consequence: str,
                     key: str = 'end') -> None:
        """Refuse a schedule point ``end`` that lies after the last iteration, before any step.

        Raises:
            ValueError: naming the window, the training length and the largest valid ``key``.
        """
        if self.iterations(runner, end) <= runner.max_iters:
            return
        if self.by_epoch:
            total = runner.max_iters // len(runner.train_dataloader)
            length = f'{total} epochs ({runner.max_iters} iterations)'
        else:
            total = runner.max_iters
            length = f'max_iters={total}'
        raise ValueError(f'{type(self).__name__}: the {window} ends after training ({length}): '
                         f'{consequence}; set {key} <= {total} or train longer')

    def is_last(self, runner) -> bool:
        """Whether the iteration that just ran (inside ``after_train_iter``) is the last one."""
        return runner.iter + 1 >= runner.max_iters

    def logs_now(self, runner) -> bool:
        """Whether ``after_train_iter`` logs: every :attr:`interval` iterations and at the end."""
        return self.is_last(runner) or self.every_n_train_iters(runner, self.interval)

    # -- distributed ----------------------------------------------------------------------------
    def label(self, runner) -> str:
        """The method's name in messages."""
        return type(self).__name__

    def check_ranks(self, runner, when: str,
                    layers: Optional[Sequence[Tuple[str, nn.Module]]] = None) -> None:
        """Under DDP, raise if any :attr:`rank_state` tensor differs between ranks."""
        layers = self.layers(runner) if layers is None else layers
        named = [(f'{name}.{key}', getattr(layer, key)) for name, layer in layers
                 for key in self.rank_state if getattr(layer, key, None) is not None]
        differ = differing_across_ranks(named)
        if differ:
            raise RuntimeError(
                f'{self.label(runner)}: {"/".join(self.rank_state)} differ across ranks {when}: '
                f'{len(differ)} tensors, e.g. {differ[:5]}; every rank must hold the same state '
                '(same config and checkpoint on every rank)')

    # -- checkpoints ----------------------------------------------------------------------------
    @staticmethod
    def missing_state(checkpoint: dict,
                      layers: Sequence[Tuple[str, nn.Module]]) -> Dict[str, List[str]]:
        """``{layer: [keys]}`` of the declared ``compression_state`` of ``layers`` that
        ``checkpoint`` lacks.

        A key counts as missing when the checkpoint lacks it or holds it in another shape (MMEngine
        loads non-strictly and skips such keys with a warning only). ``None`` state (a dense-by-rule
        layer's) is never required.
        """
        state = checkpoint.get('state_dict', checkpoint)
        state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
        missing = {}
        for name, layer in layers:
            own = layer.state_dict()
            keys = [k for k in layer.compression_state if k in own and (
                f'{name}.{k}' not in state
                or tuple(getattr(state[f'{name}.{k}'], 'shape', ())) != tuple(own[k].shape))]
            if keys:
                missing[name] = keys
        return missing

    @staticmethod
    def resuming(runner, checkpoint: dict) -> bool:
        """Whether ``checkpoint`` is being resumed (not only loaded with ``load_from``).

        ``after_load_checkpoint`` runs inside ``Runner.resume`` before the iteration is restored
        (``runner.iter`` is still 0), so a resume is told by the runner's flag and the checkpoint's
        own iteration.
        """
        return bool(getattr(runner, '_resume', False)) and (
            (checkpoint.get('meta') or {}).get('iter', 0) > 0)

    # -- optimizer wrapper ----------------------------------------------------------------------
    def bind_optim_wrapper(self, runner) -> Optional[GradEditMixin]:
        """Bind the optimizer wrapper to the model if it implements :attr:`wrapper_type`.

        Returns the wrapper, or None (after a warning with :attr:`wrapper_advice`) when the
        configured wrapper applies no gradient edit of this method.
        """
        wrapper = runner.optim_wrapper
        if self.wrapper_type is not None and isinstance(wrapper, self.wrapper_type):
            bound = wrapper.bind_model(self.model(runner))
            runner.logger.info(f'{type(self).__name__}: {type(wrapper).__name__} edits the '
                               f'gradients of {bound} layers')
            return wrapper
        runner.logger.warning(f'{type(self).__name__}: optimizer wrapper {type(wrapper).__name__} '
                              f'applies no gradient edit of this method; {self.wrapper_advice}')
        return None

