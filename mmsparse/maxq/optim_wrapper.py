"""Optimizer wrappers applying the N:M gradient edits (SR-STE decay, one-shot gradient masking)."""
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from ..engine.grad_edit import GradEditAmpOptimWrapper, GradEditOptimWrapper
from .layers import NMSparseMixin


class NMGradEdit:
    """Edits every bound N:M layer; ``decay`` is the SR-STE λ."""

    def __init__(self, *args, decay: float = 2e-4, **kwargs) -> None:
        if decay < 0:
            raise ValueError(f'decay must be >= 0, got {decay}')
        super().__init__(*args, **kwargs)
        self.decay = decay

    def is_target(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, NMSparseMixin) and module.is_sparse

    def edit_gradients(self) -> None:  # noqa: D102
        for layer in self.targets:
            layer.edit_grad(self.decay)

    def after_step(self) -> None:  # noqa: D102
        for layer in self.targets:
            layer.after_step()


@OPTIM_WRAPPERS.register_module()
class NMSparseOptimWrapper(NMGradEdit, GradEditOptimWrapper):
    """fp32 wrapper adding ``decay·(1 − clamp(S,0,1))·W`` to N:M layers' gradients before the step.

    Args:
        decay (float): SR-STE decay λ. Defaults to 2e-4.
        **kwargs: :class:`mmengine.optim.OptimWrapper` arguments.
    """


@OPTIM_WRAPPERS.register_module()
class NMSparseAmpOptimWrapper(NMGradEdit, GradEditAmpOptimWrapper):
    """AMP variant of :class:`NMSparseOptimWrapper`; the decay is added to unscaled gradients."""
