"""Convert a checkpoint of the MaxQ reference code (JingyangXiang/MaxQ ImageNet ResNets) to mmdet keys.

The reference wraps every sparse conv and its BatchNorm in one module (``convbnK`` with ``conv``,
``scale`` and a ``mask`` buffer); mmdet's ``ResNet`` names them ``convK``/``bnK`` and
``downsample.0``/``downsample.1``. The stem (``conv1``/``bn1``) keeps its names; ``fc`` is dropped.
"""
import re
from collections import OrderedDict
from typing import Dict, Mapping

from torch import Tensor

_RULES = [
    (re.compile(r'^(layer\d+\.\d+)\.convbn(\d)\.conv\.(weight|bias)$'), r'\1.conv\2.\3'),
    (re.compile(r'^(layer\d+\.\d+)\.convbn(\d)\.scale\.(.+)$'), r'\1.bn\2.\3'),
    (re.compile(r'^(layer\d+\.\d+)\.convbn(\d)\.mask$'), r'\1.conv\2.mask'),
    (re.compile(r'^(layer\d+\.\d+)\.downsample\.conv\.(weight|bias)$'), r'\1.downsample.0.\2'),
    (re.compile(r'^(layer\d+\.\d+)\.downsample\.scale\.(.+)$'), r'\1.downsample.1.\2'),
    (re.compile(r'^(layer\d+\.\d+)\.downsample\.mask$'), r'\1.downsample.0.mask'),
    (re.compile(r'^(conv1\.weight|bn1\..+)$'), r'\1'),
]


def convert_maxq_reference(state_dict: Mapping[str, Tensor], fold: bool = True) -> Dict[str, Tensor]:
    """Map a reference MaxQ ResNet state dict to mmdet ``ResNet`` keys.

    Args:
        state_dict: The reference state dict (a ``module.`` prefix from DataParallel is stripped).
        fold (bool): Multiply each conv weight by its mask (``W ⊙ S``, exact N:M zeros) and drop the
            masks, giving a plain dense-layout checkpoint. Otherwise keep masks as ``convK.mask``
            buffers of mmsparse's N:M layers. Defaults to True.

    Raises:
        KeyError: a key matches no rule (other than ``fc.*``) — the file is not a reference ResNet.
    """
    out: Dict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key.startswith('fc.'):
            continue
        for pattern, repl in _RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            raise KeyError(f'{key!r} is not a key of the MaxQ reference ResNet layout')
    if fold:
        for key in [k for k in out if k.endswith('.mask')]:
            weight_key = key[:-len('mask')] + 'weight'
            out[weight_key] = out[weight_key] * out.pop(key)
    return out
