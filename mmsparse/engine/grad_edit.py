"""Optimizer-wrapper base for gradient edits between backward and step.

``OptimWrapper.update_params`` runs backward → step → zero_grad with no hook in between, so methods
that edit gradients (SR-STE decay, CGMQ's constraint term) do it in ``step``. Under AMP the gradients
are unscaled first, so every edit sees true gradients.
"""
from typing import List, Optional, Union

import torch
from mmengine.device import (is_cuda_available, is_mlu_available, is_musa_available,
                             is_npu_available)
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from torch import nn


class GradEditMixin:
    """Calls ``edit_gradients`` before and ``after_step`` after the optimizer step.

    Subclasses implement :meth:`edit_gradients` (and optionally :meth:`after_step`) over the modules
    that :meth:`bind_model` collects with :meth:`is_target`. The method's hook binds the model in
    ``before_train``; a step on an unbound wrapper is an error rather than a silent no-op.
    """

    _targets: List[nn.Module]

    def is_target(self, module: nn.Module) -> bool:
        """Whether ``module`` takes part in the gradient edit."""
        raise NotImplementedError

    def bind_model(self, model: nn.Module) -> int:
        """Collect the target modules of ``model``; return how many were found."""
        self._targets = [mod for mod in model.modules() if self.is_target(mod)]
        return len(self._targets)

    @property
    def targets(self) -> List[nn.Module]:
        """The bound modules; raises if no hook bound a model."""
        if not hasattr(self, '_targets'):
            raise RuntimeError(f'{type(self).__name__} was not bound to a model: add the method\'s '
                               'hook (e.g. MaxQHook or CGMQHook) to custom_hooks')
        return self._targets

    def edit_gradients(self) -> None:
        """Edit the (unscaled) gradients of the bound modules."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Runs after the optimizer step (e.g. re-apply a fixed mask)."""


class GradEditOptimWrapper(GradEditMixin, OptimWrapper):
    """fp32 optimizer wrapper running :meth:`edit_gradients` right before ``optimizer.step``."""

    def step(self, **kwargs) -> None:  # noqa: D102
        self.edit_gradients()
        super().step(**kwargs)
        self.after_step()


class GradEditAmpOptimWrapper(GradEditMixin, AmpOptimWrapper):
    """AMP optimizer wrapper: unscale, edit, clip, then the scaler's step.

    Unlike mmengine's ``AmpOptimWrapper`` it also runs on CPU-only machines: there it autocasts to
    ``dtype`` (default bfloat16) and uses torch's CPU ``GradScaler``.
    """

    def __init__(self, loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Optional[Union[str, torch.dtype]] = None, use_fsdp: bool = False,
                 **kwargs) -> None:
        if any(f() for f in (is_cuda_available, is_npu_available, is_mlu_available,
                             is_musa_available)):
            super().__init__(loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp, **kwargs)
            return
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        if loss_scale == 'dynamic':
            self.loss_scaler = torch.amp.GradScaler('cpu')
        elif isinstance(loss_scale, float):
            self._scale_update_param = loss_scale
            self.loss_scaler = torch.amp.GradScaler('cpu', init_scale=loss_scale)
        elif isinstance(loss_scale, dict):
            self.loss_scaler = torch.amp.GradScaler('cpu', **loss_scale)
        else:
            raise TypeError(f'loss_scale must be a float, a dict or "dynamic", got {loss_scale!r}')
        self.cast_dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or
                                                                             torch.bfloat16)

    def step(self, **kwargs) -> None:  # noqa: D102
        self.loss_scaler.unscale_(self.optimizer)
        self.edit_gradients()
        if self.clip_grad_kwargs:
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)
        self.after_step()
