"""The MaxQ reference checkpoint layout converts to mmdet ResNet keys."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from torch import nn

import mmsparse  # noqa: F401
from mmsparse.maxq.convert import convert_maxq_reference


class _ConvBN(nn.Module):  # the reference's conv + BN "scale" module with a mask buffer

    def __init__(self, cin, cout, k, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, bias=False)
        self.scale = nn.BatchNorm2d(cout)
        self.register_buffer('mask', (torch.rand(cout, cin, k, k) > 0.5).float())


class _Basic(nn.Module):

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.convbn1 = _ConvBN(cin, cout, 3, stride)
        self.convbn2 = _ConvBN(cout, cout, 3)
        self.downsample = _ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None


class _RefResNet18(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, bias=False), nn.BatchNorm2d(64)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (cin, cout, s) in enumerate(widths, 1):
            setattr(self, f'layer{i}', nn.Sequential(_Basic(cin, cout, s), _Basic(cout, cout, 1)))
        self.fc = nn.Linear(512, 10)


@pytest.mark.parametrize('fold', [True, False])
def test_reference_layout_loads_into_mmdet_resnet(fold):
    ref = {f'module.{k}': v for k, v in _RefResNet18().state_dict().items()}
    out = convert_maxq_reference(ref, fold=fold)
    target = ResNet(depth=18, conv_cfg=None if fold else dict(type='MaxQConv2d', n=2, m=4))
    result = target.load_state_dict(out, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys == ([] if fold else ['conv1.mask'])
    w = ref['module.layer2.0.convbn1.conv.weight'] * ref['module.layer2.0.convbn1.mask']
    if fold:
        assert torch.equal(out['layer2.0.conv1.weight'], w)
    else:
        assert torch.equal(out['layer2.0.downsample.0.mask'], ref['module.layer2.0.downsample.mask'])


def test_foreign_key_is_refused():
    with pytest.raises(KeyError, match='not a key of the MaxQ reference'):
        convert_maxq_reference({'backbone.stem.weight': torch.zeros(1)})
