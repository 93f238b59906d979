"""Pack a folded model for mmsparse's CPU runtime: verify patterns, choose a tactic per layer, swap.

:func:`pack` takes any module holding folded weights (a plain mmdet detector loaded from
``tools/fold.py`` output, a bare backbone, ...). Each declared layer (``patterns``, or the fold meta of
``checkpoint``) is verified against its pattern, then, like a TensorRT builder, timed dense vs
sparse on its real input (captured from ``example_inputs`` with forward hooks) and given the faster
tactic; with ``example_inputs`` the packed model is also checked against the unpacked one.
"""
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import Tensor, nn

from ..core.blocks import BlockPattern
from ..core.patterns import NMPattern
from ..core.quant import QuantGrid
from ..core.spec import Dense, FoldSpec, Pattern, parse_pattern
from ..export.verify import PatternViolationError, checkpoint_specs
from .layers import (PACKED_TYPES, TACTICS, FusedReLU, PackedLayer, coverage, ensure_kernels, geometry_of,
                     packed_layer_for)

#: input of a conv timed without ``example_inputs``: (1, in_channels, 56, 56)
DEFAULT_CONV_SIZE = 56
#: rows of a linear layer's input timed without ``example_inputs`` (RoI box-head batch)
DEFAULT_LINEAR_ROWS = 512
#: largest relative error of a packed output (max |packed - reference| / max |reference|)
RTOL = 1e-4

PatternLike = Union[str, Pattern, FoldSpec]
ExampleInputs = Union[Tensor, tuple, list, dict, Callable[[nn.Module], Any]]


@dataclass
class LayerReport:
    """What :func:`pack` did with one declared layer."""

    name: str
    pattern: str
    tactic: Optional[str]           # 'sparse' / 'dense' when packed, None when left untouched
    reason: Optional[str] = None    # why the layer was left untouched
    dense_ms: Optional[float] = None
    sparse_ms: Optional[float] = None
    fused: Optional[str] = None     # 'norm', 'relu' or 'norm+relu' folded into the layer

    def __str__(self) -> str:
        if self.tactic is None:
            return f'{self.name}: {self.pattern}, left dense ({self.reason})'
        timing = ('' if self.dense_ms is None else
                  f' (dense {self.dense_ms:.3f} ms, sparse {self.sparse_ms:.3f} ms)')
        fused = f', fused {self.fused}' if self.fused else ''
        return f'{self.name}: {self.pattern}, tactic {self.tactic}{fused}{timing}'


def resolve_patterns(patterns: Optional[Mapping[str, PatternLike]] = None,
                     checkpoint: Optional[Union[str, dict]] = None) -> Dict[str, Pattern]:
    """``{layer: typed pattern}`` from ``patterns`` or from the fold meta of ``checkpoint``.

    Raises:
        ValueError: neither is given, or the checkpoint has no fold meta.
        TypeError: a pattern of an unknown type.
    """
    if patterns is None:
        if checkpoint is None:
            raise ValueError('pack needs the layer patterns: give patterns={layer: "1:16" | NMPattern | '
                             'FoldSpec} or checkpoint= (a folded checkpoint or its path, with fold meta)')
        if isinstance(checkpoint, str):
            from mmengine.runner.checkpoint import CheckpointLoader
            checkpoint = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
        patterns = checkpoint_specs(checkpoint)
    typed = {}
    for name, pattern in patterns.items():
        if isinstance(pattern, FoldSpec):
            pattern = pattern.pattern
        elif isinstance(pattern, str):
            pattern = parse_pattern(pattern)
        if not isinstance(pattern, (NMPattern, BlockPattern, QuantGrid, Dense)):
            raise TypeError(f'{name}: pattern must be a pattern string, NMPattern, BlockPattern or '
                            f'FoldSpec, got {type(pattern).__name__}')
        typed[name] = pattern
    return typed


def _flatten(out: Any, prefix: str = 'output') -> Dict[str, Tensor]:
    """The tensors of a model output (nested tuples, lists, dicts, mmengine data elements)."""
    if isinstance(out, Tensor):
        return {prefix: out}
    if hasattr(out, 'to_dict') and not isinstance(out, Mapping):
        out = out.to_dict()
    if isinstance(out, Mapping):
        items = out.items()
    else:
        items = enumerate(out) if isinstance(out, (list, tuple)) else ()
    flat = {}
    for key, value in items:
        flat.update(_flatten(value, f'{prefix}[{key!r}]'))
    return flat


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``max |out - ref| / max |ref|`` (0 for two empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _run(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    if callable(example_inputs) and not isinstance(example_inputs, (Tensor, nn.Module)):
        return example_inputs(model)
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(*example_inputs)


def median_times(candidates: Dict[str, nn.Module], inputs: List[Tensor], repeats: int) -> Dict[str, float]:
    """Median seconds of each candidate over ``inputs``, repetitions interleaved (order alternating)."""
    times: Dict[str, List[float]] = {key: [] for key in candidates}
    for module in candidates.values():  # warm-up
        module(inputs[0])
    for rep in range(repeats):
        order = list(candidates) if rep % 2 == 0 else list(reversed(candidates))
        for key in order:
            start = time.perf_counter()
            for x in inputs:
                candidates[key](x)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def _default_input(module: nn.Module) -> Tensor:
    if isinstance(module, nn.Conv2d):
        size = max(DEFAULT_CONV_SIZE, *[d * (k - 1) + 1 for d, k in zip(module.dilation, module.kernel_size)])
        return torch.randn(1, module.in_channels, size, size)
    return torch.randn(DEFAULT_LINEAR_ROWS, module.in_features)


def _reference(module: nn.Module, x: Tensor, norm: Optional[nn.Module] = None, relu: bool = False) -> Tensor:
    """What the unpacked layer (and the norm and ReLU fused into it) computes."""
    weight, bias = module.weight.float(), None if module.bias is None else module.bias.float()
    if isinstance(module, nn.Conv2d):
        out = F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation)
    else:
        out = F.linear(x, weight, bias)
    out = out if norm is None else norm(out)
    return F.relu(out) if relu else out


class _FusionTracer:
    """Forward hooks finding, in one run, each packed conv whose output only an eval-mode BatchNorm
    reads (both called once) and the in-place ReLU that reads the BatchNorm's (or the conv's) output
    unchanged (same tensor, same version: no in-place add between): mmdet's conv -> norm -> ReLU.
    Outputs are kept alive during the run so their ids stay unique."""

    def __init__(self, modules: Dict[str, nn.Module], convs: List[str]) -> None:
        self.calls: Dict[str, int] = defaultdict(int)
        self.conv_out: Dict[Tuple[int, int], str] = {}   # (id, version) of a conv output -> conv
        self.norm_in: Dict[str, Tuple[int, int]] = {}
        self.norm_out: Dict[Tuple[int, int], str] = {}
        self.relu_in: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
        self.keep: List[Tensor] = []
        self.handles = []
        for name, module in modules.items():
            if name in convs and isinstance(module, nn.Conv2d):
                self.handles.append(module.register_forward_hook(self._conv(name)))
            elif isinstance(module, nn.BatchNorm2d) and not module.training and module.track_running_stats:
                self.handles.append(module.register_forward_hook(self._norm(name)))
            elif isinstance(module, nn.ReLU) and module.inplace:
                self.handles.append(module.register_forward_pre_hook(self._relu(name)))

    def _key(self, tensor: Tensor) -> Tuple[int, int]:
        self.keep.append(tensor)
        return id(tensor), tensor._version

    def _conv(self, name: str):
        def hook(_, args, out):
            self.calls[name] += 1
            self.conv_out[self._key(out)] = name
        return hook

    def _norm(self, name: str):
        def hook(_, args, out):
            self.calls[name] += 1
            self.norm_in[name] = self._key(args[0])
            self.norm_out[self._key(out)] = name
        return hook

    def _relu(self, name: str):
        def hook(_, args):
            self.relu_in[name].append(self._key(args[0]))
        return hook

    def fusions(self) -> Dict[str, Dict[str, str]]:
        """``{conv: {'norm': norm name, 'relu': relu name}}`` (either key may be missing)."""
        found: Dict[str, Dict[str, str]] = defaultdict(dict)
        conv_of_norm = {}
        for norm, source in self.norm_in.items():
            conv = self.conv_out.get(source)
            if conv is not None and self.calls[conv] == 1 and self.calls[norm] == 1:
                found[conv]['norm'] = norm
                conv_of_norm[norm] = conv
        for relu, sources in self.relu_in.items():
            for source in sources:
                conv = conv_of_norm.get(self.norm_out.get(source))
                direct = self.conv_out.get(source)
                if conv is None and direct is not None and self.calls[direct] == 1 \
                        and 'norm' not in found[direct]:
                    conv = direct
                if conv is not None:
                    found[conv]['relu'] = relu
        self.keep.clear()
        return {conv: fused for conv, fused in found.items() if fused}


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent_name), child, module)


def pack(model: nn.Module,
         patterns: Optional[Mapping[str, PatternLike]] = None,
         example_inputs: Optional[ExampleInputs] = None,
         tactic: Union[str, Mapping[str, str]] = 'auto',
         checkpoint: Optional[Union[str, dict]] = None,
         repeats: int = 7,
         fuse: bool = True) -> nn.Module:
    """Swap the declared sparse conv / linear layers of ``model`` for packed inference layers.

    Args:
        model (nn.Module): Holds the folded weights; modified in place (and put in eval mode).
        patterns (Mapping, optional): ``{layer name in model: '1:16' | NMPattern | BlockPattern |
            FoldSpec}``. Defaults to the fold meta of ``checkpoint``.
        example_inputs (optional): What the model is run on to capture each layer's real input and to
            check the packed model: a tensor, a tuple of arguments, a dict of keyword arguments or a
            callable ``fn(model)``. Without it, ``'auto'`` times each layer on a default input
            (``(1, C, 56, 56)`` for convs, ``(512, in_features)`` for linears) and nothing is checked.
        tactic (str | Mapping): ``'auto'`` (time dense vs sparse, keep the faster), ``'sparse'`` or
            ``'dense'``, for all layers or per layer ``{name: tactic}`` (``'auto'`` for the others),
            e.g. :func:`tactics` of an earlier pack to reproduce it.
        checkpoint (str | dict, optional): Folded checkpoint (or its path) whose fold meta gives the
            patterns when ``patterns`` is None.
        repeats (int): Timed repetitions per tactic for ``'auto'`` (median). Defaults to 7.
        fuse (bool): With ``example_inputs``, fold the eval-mode BatchNorm that only reads a packed
            conv's output into it and run the in-place ReLU after it in the kernel (mmdet's conv ->
            norm -> ReLU, found with forward hooks; the output check guards it). Defaults to True.

    Returns:
        nn.Module: ``model``, with ``model.mmsparse_pack_report`` (list of :class:`LayerReport`).

    Raises:
        ValueError: no patterns, a declared layer missing from the model, a weight breaking its
            pattern (:class:`~mmsparse.export.verify.PatternViolationError`, naming the layers), a bad
            tactic, or a packed output off the unpacked one by more than ``RTOL``.
    """
    specs = resolve_patterns(patterns, checkpoint)
    modules = dict(model.named_modules())
    missing = [name for name in specs if name not in modules or name == '']
    if missing:
        raise ValueError(f'declared layer(s) not found in the model: {", ".join(missing)}')
    tactic_of = {name: tactic if isinstance(tactic, str) else tactic.get(name, 'auto') for name in specs}
    unknown = [name for name in (tactic if isinstance(tactic, Mapping) else ()) if name not in specs]
    bad = {name: t for name, t in tactic_of.items() if t not in TACTICS + ('auto',)}
    if bad or unknown:
        raise ValueError(f'bad tactics {bad} (use "auto", "sparse" or "dense")' if bad else
                         f'tactic given for undeclared layer(s): {", ".join(unknown)}')

    reports: Dict[str, LayerReport] = {}
    eligible = []
    violations = []
    for name, pattern in specs.items():
        module = modules[name]
        reason = ('dense in the fold meta' if isinstance(pattern, Dense) else
                  'quantized: the runtime has no quantized kernel' if isinstance(pattern, QuantGrid) else
                  coverage(module))
        if reason is not None:
            reports[name] = LayerReport(name, str(pattern), None, reason)
            continue
        violations += pattern.violations(name, module.weight)[:1]
        eligible.append(name)
    if violations:
        raise PatternViolationError(violations)
    if any(tactic_of[name] != 'dense' for name in eligible):
        ensure_kernels()

    model.eval()
    captured: Dict[str, List[Tensor]] = {}
    reference, fusions = None, {}
    with torch.no_grad():
        if example_inputs is not None:
            def capture(name):
                def hook(_, args):  # every call (a shared head runs once per FPN level)
                    captured.setdefault(name, []).append(args[0].detach().clone())
                return hook
            handles = [modules[name].register_forward_pre_hook(capture(name)) for name in eligible]
            try:
                tracer = _FusionTracer(modules, eligible) if fuse else None
                reference = _flatten(_run(model, example_inputs))
                fusions = tracer.fusions() if fuse else {}
            finally:
                for handle in handles + (tracer.handles if fuse else []):
                    handle.remove()
        packed = {}
        for name in eligible:
            module, pattern, fused = modules[name], str(specs[name]), fusions.get(name, {})
            cls, norm = packed_layer_for(module, specs[name]), modules.get(fused.get('norm'))
            build = partial(cls.from_module, module, pattern, norm=norm, fused=fused)
            inputs = captured.get(name, [])
            if inputs and tactic_of[name] != 'dense':  # the kernel must give the layer's outputs
                layer = build('sparse')
                err = max(relative_error(layer(x), _reference(module, x, norm, 'relu' in fused))
                          for x in inputs)
                if err > RTOL:
                    raise ValueError(f'{name}: packed output differs from the dense layer by {err:.2e} '
                                     f'(relative) > {RTOL}')
            chosen, timings = tactic_of[name], {}
            if chosen == 'auto':
                candidates = {t: build(t) for t in TACTICS}
                timings = median_times(candidates, inputs or [_default_input(module)], repeats)
                chosen = 'sparse' if timings['sparse'] < timings['dense'] else 'dense'
            packed[name] = build(chosen, timings)
            ms = [timings['dense'] * 1e3, timings['sparse'] * 1e3] if timings else []
            reports[name] = LayerReport(name, pattern, chosen, None, *ms,
                                        fused='+'.join(sorted(fused)) or None)
        swaps = dict(packed)
        for fused in fusions.values():
            if 'norm' in fused:
                swaps[fused['norm']] = nn.Identity()
            if 'relu' in fused:
                swaps[fused['relu']] = FusedReLU(inplace=True)
        for name, layer in swaps.items():
            _swap(model, name, layer)
        if reference is not None:
            try:
                _check_outputs(_flatten(_run(model, example_inputs)), reference)
            except ValueError:
                for name in swaps:
                    _swap(model, name, modules[name])
                raise
    model.mmsparse_pack_report = [reports[name] for name in specs]
    _log(model.mmsparse_pack_report)
    return model


def _check_outputs(outputs: Dict[str, Tensor], reference: Dict[str, Tensor]) -> None:
    if outputs.keys() != reference.keys() or any(outputs[k].shape != reference[k].shape for k in reference):
        raise ValueError('the packed model returns outputs of other shapes than the unpacked one '
                         '(compare raw tensors, e.g. mmdet mode="tensor")')
    errors = {key: relative_error(outputs[key], ref) for key, ref in reference.items()}
    worst = max(errors, key=errors.get, default=None)
    if worst is not None and errors[worst] > RTOL:
        raise ValueError(f'packed model output {worst} differs from the unpacked model by '
                         f'{errors[worst]:.2e} (relative) > {RTOL}')


def _log(reports: List[LayerReport]) -> None:
    counts = {t: sum(r.tactic == t for r in reports) for t in TACTICS}
    lines = '\n'.join(f'  {r}' for r in reports)
    print_log(f'mmsparse runtime: {counts["sparse"]} layer(s) sparse, {counts["dense"]} dense tactic, '
              f'{sum(r.tactic is None for r in reports)} left dense:\n{lines}', logger='current')


def tactics(model: nn.Module) -> Dict[str, str]:
    """``{layer: tactic}`` of the packed layers (pass it as ``pack(..., tactic=)`` to reproduce)."""
    return {name: m.tactic for name, m in model.named_modules() if isinstance(m, PackedLayer)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state (parameters and buffers, packed or dense)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor))


def load_packed(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a packed model's ``state_dict`` into an unpacked ``model`` of the same architecture.

    The packed layers named in the state replace the model's conv / linear layers (no re-packing),
    the BatchNorms and ReLUs fused into them become ``nn.Identity`` / :class:`FusedReLU`, then the
    whole state loads strictly.

    Raises:
        ValueError: the state holds no packed layer, or it does not match the model (a layer missing,
            of another type or geometry, keys missing or unexpected).
    """
    suffix = '._extra_state'
    layers = {key[:-len(suffix)]: value for key, value in state_dict.items()
              if key.endswith(suffix) and isinstance(value, Mapping) and value.get('layer') in PACKED_TYPES}
    if not layers:
        raise ValueError('the state holds no mmsparse packed layer (save the state_dict of a packed model)')
    modules = dict(model.named_modules())
    for name, extra in layers.items():
        module = modules.get(name)
        if module is None:
            raise ValueError(f'packed state does not match the model: it has no layer {name}')
        if isinstance(module, PackedLayer):
            continue
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f'packed state does not match the model: {name} is a {type(module).__name__}')
        mine, saved = geometry_of(module), extra['geometry']
        diff = [f'{k} {saved.get(k)!r} in the state, {mine[k]!r} here'
                for k in mine if mine[k] != saved.get(k)]
        if diff:
            raise ValueError(f'packed state does not match the model at {name}: {"; ".join(diff)}')
        tensors = {key[len(name) + 1:]: value for key, value in state_dict.items()
                   if key.startswith(name + '.') and isinstance(value, Tensor)}
        try:
            _swap(model, name, PACKED_TYPES[extra['layer']].from_state(extra, tensors))
            for kind, fused in (extra.get('fused') or {}).items():
                expected = nn.BatchNorm2d if kind == 'norm' else nn.ReLU
                if not isinstance(modules.get(fused), expected):
                    raise ValueError(f'packed state does not match the model: {fused}, fused into {name}, '
                                     f'is no {expected.__name__} here')
                _swap(model, fused, nn.Identity() if kind == 'norm' else FusedReLU(inplace=True))
        except KeyError as err:
            raise ValueError(f'packed state does not match the model: {name}.{err.args[0]} '
                             'is missing') from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f'packed state does not match the model: {err}') from None
    model.eval()  # some modules' train() (mmdet's ResNet) returns None
    return model
