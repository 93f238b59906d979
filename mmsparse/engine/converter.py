"""Model-level converter: swap conv/linear layers for compressed ones by name patterns at build time.

Used as a model type in a config, it builds the wrapped model and returns *that* model with layers
swapped in place, so checkpoint keys stay the detector's own (no wrapper prefix)::

    model = dict(
        type='ConvertedModel',
        model=dict(type='MaskRCNN', ...),
        rules=[dict(include=r'backbone\\..*', exclude=[r'backbone\\.conv1'],
                    layer=dict(type='MaxQConv2d', n=1, m=16))])

Patterns are Python regexes matched against the whole module name (``re.fullmatch``). The swap runs
before the runner wraps the model in DDP and builds the optimizer, so the new layers' extra parameters
are trained. Parameters of the replaced layer are reused, so initial and pretrained weights carry over.
"""
import re
from typing import Dict, List, Sequence, Union

from mmengine.logging import MMLogger
from mmengine.registry import MODELS
from torch import nn

from ..core.spec import CompressedLayer

Patterns = Union[str, Sequence[str]]


def _as_list(patterns: Patterns) -> List[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _base_type(cls: type) -> type:
    for base in (nn.Conv2d, nn.Linear):
        if issubclass(cls, base):
            return base
    raise TypeError(f'{cls.__name__} is neither a Conv2d nor a Linear subclass')


def _build_like(cls: type, old: nn.Module, layer_kwargs: dict) -> nn.Module:
    if isinstance(old, nn.Conv2d):
        new = cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                  padding=old.padding, dilation=old.dilation, groups=old.groups,
                  bias=old.bias is not None, padding_mode=old.padding_mode, **layer_kwargs)
    else:
        new = cls(old.in_features, old.out_features, bias=old.bias is not None, **layer_kwargs)
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    return new.to(old.weight.device)


def convert_layers(model: nn.Module, rules: List[dict]) -> Dict[str, str]:
    """Swap layers of ``model`` in place following ``rules``; return ``{name: new type}``.

    Each rule is ``dict(include=..., exclude=..., layer=dict(type=..., **kwargs))``. A rule whose
    layer type is a conv class converts ``nn.Conv2d`` modules, a linear class ``nn.Linear`` modules.

    Raises:
        ValueError: a rule matches nothing, two rules match the same layer, or a rule matches a layer
            that is already compressed (e.g. through ``conv_cfg``).
    """
    converted: Dict[str, str] = {}
    modules = dict(model.named_modules())
    for idx, rule in enumerate(rules):
        unknown = set(rule) - {'include', 'exclude', 'layer'}
        if unknown or 'include' not in rule or 'layer' not in rule:
            raise ValueError(f'conversion rule {idx} needs keys include, layer (and optional '
                             f'exclude); got {sorted(rule)}')
        layer_cfg = dict(rule['layer'])
        cls = MODELS.get(layer_cfg.pop('type'))
        if cls is None:
            raise ValueError(f'conversion rule {idx}: unknown layer type {rule["layer"]["type"]!r}')
        base = _base_type(cls)
        include = [re.compile(p) for p in _as_list(rule['include'])]
        exclude = [re.compile(p) for p in _as_list(rule.get('exclude', []))]
        matched = 0
        for name, module in modules.items():
            if not isinstance(module, base) or not any(p.fullmatch(name) for p in include):
                continue
            if any(p.fullmatch(name) for p in exclude):
                continue
            if name in converted:
                raise ValueError(f'layer {name!r} is matched by two conversion rules '
                                 f'({converted[name]} and {cls.__name__}); one method per layer')
            if isinstance(module, CompressedLayer):
                raise ValueError(f'layer {name!r} is already a {type(module).__name__} (from '
                                 f'conv_cfg?); conversion rule {idx} would stack {cls.__name__} on it')
            parent_name, _, child = name.rpartition('.')
            parent = modules[parent_name] if parent_name else model
            try:
                setattr(parent, child, _build_like(cls, module, layer_cfg))
            except ValueError as err:
                raise ValueError(f'layer {name!r}: {err}') from err
            converted[name] = cls.__name__
            matched += 1
        if matched == 0:
            raise ValueError(f'conversion rule {idx} (include={rule["include"]!r}) matched no '
                             f'{base.__name__} layer')
    return converted


@MODELS.register_module()
def ConvertedModel(model: dict, rules: List[dict]) -> nn.Module:  # noqa: N802 (registry type name)
    """Build ``model`` and convert its layers by ``rules`` (see :func:`convert_layers`)."""
    built = MODELS.build(model)
    converted = convert_layers(built, rules)
    MMLogger.get_current_instance().info(
        f'ConvertedModel: {len(converted)} layers converted '
        f'({", ".join(sorted(set(converted.values())))})')
    return built
