"""NaN/inf checks of compressed layers and checkpoints, with one message format for every method.

A hook calls :func:`check_finite` in ``before_train`` (after checkpoint loading, so a NaN checkpoint
is refused before the first iteration) and where it already reads the tensors (SA++ when it sets the
supports, CGMQ when it counts BOPs and at its log interval; MaxQ's mask computation checks its
weights itself); folding calls it on the loaded model before anything is written. The error names
the first tensors that hold NaN/inf and how many of their values are bad::

    FloatingPointError: SequentialAttentionHook: backbone.layer2.0.conv1.weight holds 1 NaN/inf values
    at iteration 0; <what the caller advises>

Cost: one ``torch.isfinite(t).all()`` per tensor and a single host synchronisation for all of them;
the bad values are counted only for tensors that hold some.
"""
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

TensorSource = Union[nn.Module, Mapping[str, Tensor], Iterable[Tuple[str, Tensor]]]
# what the hooks advise, at the start of training and after a step
ADVICE_LOADED = 'check the loaded checkpoint (load_from / resume) or the pretrained weights'
ADVICE_DIVERGED = ('training diverged in this step: lower the learning rate, clip gradients '
                   '(optim_wrapper.clip_grad) or check the data')


@dataclass(frozen=True)
class NonFinite:
    """A tensor holding NaN/inf values."""

    name: str
    count: int

    def __str__(self) -> str:
        return f'{self.name} holds {self.count} NaN/inf values'


def layer_tensors(layers: Iterable[Tuple[str, nn.Module]],
                  attrs: Sequence[str] = ('weight',)) -> List[Tuple[str, Tensor]]:
    """``(f'{layer}.{attr}', tensor)`` for every attribute in ``attrs`` a layer holds as a tensor.

    Attributes a layer lacks or holds as ``None`` (e.g. the logits of a dense-by-rule layer) are
    skipped.
    """
    named = []
    for name, layer in layers:
        for attr in attrs:
            value = getattr(layer, attr, None)
            if isinstance(value, Tensor):
                named.append((f'{name}.{attr}', value))
    return named


def _named(tensors: TensorSource) -> List[Tuple[str, Tensor]]:
    if isinstance(tensors, nn.Module):
        return list(tensors.state_dict(keep_vars=True).items())
    if isinstance(tensors, Mapping):
        return list(tensors.items())
    return list(tensors)


@torch.no_grad()
def find_nonfinite(tensors: TensorSource) -> List[NonFinite]:
    """The floating-point tensors holding NaN/inf, in order, with their number of bad values.

    Args:
        tensors: A module (its parameters and buffers, named as in its state dict), a state dict,
            or ``(name, tensor)`` pairs such as :func:`layer_tensors` gives. Non-tensors and integer
            or boolean tensors are skipped.
    """
    named = [(n, t.detach()) for n, t in _named(tensors)
             if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t).all().to(device) for _, t in named])
    if bool(finite.all()):
        return []
    return [NonFinite(name, int((~torch.isfinite(t)).sum()))
            for (name, t), ok in zip(named, finite.tolist()) if not ok]


def nonfinite_message(owner: str, bad: Sequence[NonFinite], iteration: Optional[int] = None,
                      advice: str = '', limit: int = 3) -> str:
    """``'<owner>: <tensor> holds N NaN/inf values at iteration I; ...'`` naming ``limit`` tensors."""
    first = bad[0]
    when = '' if iteration is None else f' at iteration {iteration}'
    text = f'{owner}: {first}{when}'
    others = bad[1:]
    if others:
        shown = ', '.join(f'{b.name} ({b.count})' for b in others[:limit - 1])
        rest = len(others) - (limit - 1)
        text += (f' (and {len(others)} more tensor(s): {shown}'
                 f'{f", ... {rest} more" if rest > 0 else ""})')
    return f'{text}; {advice}' if advice else text


def check_finite(owner: str, tensors: TensorSource, iteration: Optional[int] = None,
                 advice: str = '') -> None:
    """Raise ``FloatingPointError`` (:func:`nonfinite_message`) if any tensor holds NaN/inf.

    Args:
        owner (str): Who checks, first word of the message (e.g. the hook's class name).
        tensors: What :func:`find_nonfinite` takes.
        iteration (int, optional): The runner's iteration, stated in the message. Defaults to None.
        advice (str): What the user should do, appended after ``'; '``. Defaults to ''.
    """
    bad = find_nonfinite(tensors)
    if bad:
        raise FloatingPointError(nonfinite_message(owner, bad, iteration, advice))


def finite_loss(outputs) -> bool:
    """Whether a training step's ``outputs`` (mmengine's log vars) report a finite ``loss``.

    A hook's ``after_train_iter`` can test this scalar every step for free and run the full tensor
    check (:func:`check_finite`) only when it fails; ``False`` when there is no loss to read.
    """
    loss = outputs.get('loss') if isinstance(outputs, Mapping) else None
    return loss is not None and bool(torch.isfinite(torch.as_tensor(loss)).all())
