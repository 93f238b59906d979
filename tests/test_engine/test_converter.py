import pytest
from mmengine.registry import MODELS
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.engine import convert_layers
from mmsparse.maxq import MaxQConv2d, MaxQLinear


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 32, 1))
        self.head = nn.Linear(32, 8)


def _rule(include, exclude=(), **layer):
    layer = {'type': 'MaxQConv2d', 'n': 2, 'm': 4, **layer}
    return dict(include=include, exclude=list(exclude), layer=layer)


def test_converts_by_pattern_and_keeps_parameters():
    net = Net()
    w = net.backbone[1].weight
    converted = convert_layers(net, [_rule(r'backbone\..*', [r'backbone\.0']),
                                     _rule('head', type='MaxQLinear')])
    assert converted == {'backbone.1': 'MaxQConv2d', 'backbone.2': 'MaxQConv2d', 'head': 'MaxQLinear'}
    assert type(net.backbone[0]) is nn.Conv2d
    assert isinstance(net.backbone[1], MaxQConv2d) and net.backbone[1].weight is w
    assert isinstance(net.head, MaxQLinear)
    plain = set(Net().state_dict())
    assert set(net.state_dict()) - plain == {'backbone.1.mask', 'backbone.2.mask', 'head.mask'}


def test_fullmatch_semantics():
    net = Net()
    convert_layers(net, [_rule(r'backbone\.1')])
    assert isinstance(net.backbone[1], MaxQConv2d) and type(net.backbone[2]) is nn.Conv2d


@pytest.mark.parametrize('rules,match', [
    ([_rule('nothing')], 'matched no Conv2d'),
    ([_rule(r'backbone\.1'), _rule(r'backbone\..*', [r'backbone\.0'])], 'matched by two'),
    ([_rule(r'backbone\.0', incompatible='error')], "layer 'backbone.0'.*cannot take the 2:4"),
    ([dict(include='head')], 'needs keys include, layer'),
    ([_rule('head', type='NoSuchLayer')], 'unknown layer type'),
])
def test_bad_rules(rules, match):
    with pytest.raises(ValueError, match=match):
        convert_layers(Net(), rules)


def test_already_compressed_layer_is_refused():
    net = Net()
    convert_layers(net, [_rule(r'backbone\.1')])
    with pytest.raises(ValueError, match='already a MaxQConv2d'):
        convert_layers(net, [_rule(r'backbone\.1')])


def test_converted_model_type_keeps_detector_keys():
    from mmdet.utils import register_all_modules
    register_all_modules()
    inner = dict(type='mmdet.ResNet', depth=18)
    model = MODELS.build(dict(type='ConvertedModel', model=inner,
                              rules=[_rule(r'layer4\..*conv\d', m=16)]))
    keys = set(MODELS.build(inner).state_dict())
    assert set(model.state_dict()) - keys == {f'layer4.{b}.conv{c}.mask' for b in (0, 1)
                                              for c in (1, 2)}
