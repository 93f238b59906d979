"""Constraint-guided optimizer wrappers: the CGGD gate-gradient term under a hard BOPs budget."""
import math
from typing import List, Optional

import torch
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from ..engine.grad_edit import GradEditAmpOptimWrapper, GradEditOptimWrapper
from .layers import CGMQMixin
from .quantizer import GATED_BITS


def constraint_directions(layers: List[CGMQMixin]) -> List[float]:
    """Per-layer weight of the constraint direction: the layer's BOPs share, relative to the largest."""
    bops = [layer.bops() for layer in layers]
    top = max(bops) if bops else 0
    return [b / top if top else 0.0 for b in bops]


class CGMQGradEdit:
    """Adds ``R·‖∇_g L‖·d`` to the gate gradients while BOPs exceed the budget.

    ``d`` is non-zero only on the highest switched-on gate of each quantized tensor (weight and
    input activation of every layer): switching it off halves that tensor's bit width, the smallest
    step toward fewer bits. Its size is the layer's BOPs share divided by the largest share, so the
    costliest layer gets the full ``R·‖∇_g L‖`` (which, with ``R ≥ 1``, outweighs the whole task
    gradient on the gates) and cheaper layers proportionally less. Tensors already at 2 bits get
    nothing. ``‖∇_g L‖`` is the norm of all gate gradients of the model; ``min_grad_norm`` keeps the
    term alive when it vanishes.
    """

    def __init__(self, *args, R: float = 2.0, min_grad_norm: float = 1e-3, **kwargs) -> None:
        if not (isinstance(R, (int, float)) and R >= 1):
            raise ValueError(f'CGMQ: R must be a number >= 1 (CGGD), got {R!r}')
        if min_grad_norm < 0:
            raise ValueError(f'min_grad_norm must be >= 0, got {min_grad_norm}')
        super().__init__(*args, **kwargs)
        self.R = float(R)
        self.min_grad_norm = float(min_grad_norm)
        self.budget: Optional[int] = None
        self.last_bops: Optional[int] = None
        self.constraint_active = False

    def is_target(self, module: nn.Module) -> bool:  # noqa: D102
        return isinstance(module, CGMQMixin)

    def set_budget(self, budget: int) -> None:
        """The budget in BOPs (set by :class:`~mmsparse.cgmq.CGMQHook`)."""
        self.budget = int(budget)

    @staticmethod
    def _gates(layer: CGMQMixin):
        yield layer.weight_gate, layer.bits_w
        if layer.quant_act:
            yield layer.act_gate, layer.bits_a

    @torch.no_grad()
    def edit_gradients(self) -> None:  # noqa: D102
        layers = self.targets
        if self.budget is None:
            raise RuntimeError(f'{type(self).__name__} has no budget: CGMQHook sets it in '
                               'before_train; add CGMQHook to custom_hooks')
        bops = sum(layer.bops() for layer in layers)
        self.last_bops = bops
        self.constraint_active = bops > self.budget
        if not self.constraint_active:
            return
        squares = [gate.grad.float().pow(2).sum() for layer in layers
                   for gate, _ in self._gates(layer) if gate.grad is not None]
        sq = 0.0
        for value in torch.stack(squares).tolist() if squares else ():  # one synchronisation
            sq += value
        norm = max(math.sqrt(sq), self.min_grad_norm)
        for layer, weight in zip(layers, constraint_directions(layers)):
            for gate, bits in self._gates(layer):
                if bits <= 2 or weight == 0:
                    continue
                if gate.grad is None:
                    gate.grad = torch.zeros_like(gate)
                gate.grad[GATED_BITS.index(bits)] += self.R * norm * weight


@OPTIM_WRAPPERS.register_module()
class CGMQOptimWrapper(CGMQGradEdit, GradEditOptimWrapper):
    """fp32 wrapper applying the constraint-guided gate update before every optimizer step.

    Args:
        R (float): CGGD rescale factor (>= 1) of the constraint direction relative to the norm of
            the task gradient on the gates. Defaults to 2.0.
        min_grad_norm (float): Floor of that norm, so the constraint still acts when the task
            gradient on the gates vanishes. Defaults to 1e-3.
        **kwargs: :class:`mmengine.optim.OptimWrapper` arguments.

    Note:
        Weights and ranges take plain QAT gradients. The budget comes from
        :class:`~mmsparse.cgmq.CGMQHook`, which binds the model in ``before_train``.
    """


@OPTIM_WRAPPERS.register_module()
class CGMQAmpOptimWrapper(CGMQGradEdit, GradEditAmpOptimWrapper):
    """AMP variant of :class:`CGMQOptimWrapper`; the term is added to unscaled gradients."""
