"""Dense ResNet checkpoints (torchvision/mmdet keys) load into a MaxQ backbone unchanged."""
from mmdet.models.backbones import ResNet

import mmsparse  # noqa: F401


def test_dense_resnet_checkpoint_loads_into_sparse_backbone():
    dense = ResNet(depth=18).state_dict()
    sparse = ResNet(depth=18, conv_cfg=dict(type='MaxQConv2d', n=1, m=16))
    result = sparse.load_state_dict(dense, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.endswith('.mask') for k in result.missing_keys)
    assert 'conv1.weight' in dense and 'layer2.0.downsample.0.weight' in dense  # torchvision names
