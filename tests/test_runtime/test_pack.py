"""mmsparse.runtime.pack: verification, tactic choice, outputs, state round trip, clear errors."""
import copy

import pytest
import torch
from torch import nn

from mmsparse.core.ext import kernels_available
from mmsparse.core.patterns import NMPattern
from mmsparse.core.spec import FoldSpec
from mmsparse.export.verify import FOLD_META_KEY, PatternViolationError, checkpoint_specs
from mmsparse.runtime import (BlockSparseConv2d, FusedReLU, NMSparseConv2d, NMSparseLinear, PackedLayer,
                              load_packed, pack, relative_error, tactics, weight_bytes)
from runtime_helpers import nm_weight

pytestmark = pytest.mark.skipif(not kernels_available(), reason='mmsparse._ext is not built')


class Tiny(nn.Module):
    """Stem (dense by rule), 3x3 conv -> BN -> ReLU, strided 3x3, 1x1 -> ReLU, a grouped conv, two
    linears."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 1, bias=False)
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.fc2 = nn.Linear(64, 10)
        self.relu = nn.ReLU(inplace=True)  # shared, as in mmdet's ResNet blocks

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(self.stem(x))))
        x = self.relu(self.conv3(torch.relu(self.conv2(x))))
        x = nn.functional.adaptive_avg_pool2d(self.grouped(x), 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


PATTERNS = {'conv1': '1:16', 'conv2': '2:8', 'conv3': NMPattern(1, 4), 'fc1': '2:8',
            'fc2': FoldSpec('maxq', NMPattern(2, 4))}


def folded_tiny(seed: int = 0) -> Tiny:
    """A Tiny model whose declared layers hold exact N:M weights, BN with non-trivial statistics."""
    torch.manual_seed(seed)
    model = Tiny()
    for name, pattern in [('conv1', NMPattern(1, 16)), ('conv2', NMPattern(2, 8)), ('conv3', NMPattern(1, 4)),
                          ('fc1', NMPattern(2, 8)), ('fc2', NMPattern(2, 4)), ('grouped', NMPattern(1, 4))]:
        layer = getattr(model, name)
        layer.weight.data = nm_weight(layer.weight.shape, pattern, seed=seed)
    model.bn1.running_mean.normal_()
    model.bn1.running_var.uniform_(0.5, 2.0)
    return model.eval()


def folded_checkpoint(model: nn.Module, patterns: dict) -> dict:
    """A checkpoint as tools/fold.py writes it: plain state_dict and the fold meta."""
    layers = {name: FoldSpec('maxq', NMPattern.parse(p)).to_meta() for name, p in patterns.items()}
    return dict(state_dict=model.state_dict(), meta={FOLD_META_KEY: dict(format=1, layers=layers)})


def test_pack_sparse_gives_same_outputs():
    model, x = folded_tiny(), torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    packed = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic='sparse')
    assert isinstance(packed.conv1, NMSparseConv2d) and isinstance(packed.fc1, NMSparseLinear)
    assert isinstance(packed.stem, nn.Conv2d) and not isinstance(packed.stem, NMSparseConv2d)
    assert set(tactics(packed).values()) == {'sparse'}
    with torch.no_grad():
        out = packed(x)
        other = packed(torch.randn(1, 3, 16, 16))  # another batch size, same layers
    assert relative_error(out, ref) < 1e-5
    assert other.shape == (1, 10)
    assert packed.conv1.values.numel() == model.conv1.weight.numel() // 16
    assert weight_bytes(packed) < weight_bytes(model)


def test_fusion_of_norm_and_relu():
    """conv1 -> bn1 -> relu and conv3 -> relu are fused; the shared ReLU still works elsewhere."""
    model, x = folded_tiny(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    packed = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic='sparse')
    assert packed.conv1.fused == {'norm': 'bn1', 'relu': 'relu'} and packed.conv3.fused == {'relu': 'relu'}
    assert packed.conv2.fused == {} and isinstance(packed.bn1, nn.Identity)
    assert isinstance(packed.relu, FusedReLU)
    assert {r.name: r.fused for r in packed.mmsparse_pack_report}['conv1'] == 'norm+relu'
    with torch.no_grad():
        assert relative_error(packed(x), ref) < 1e-5
        # an output changed after the conv is not passed through
        y = packed.conv3(torch.randn(1, 64, 4, 4)).sub_(10.0)
        assert torch.equal(packed.relu(y.clone()), torch.relu(y))
    unfused = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic='sparse', fuse=False)
    assert isinstance(unfused.bn1, nn.BatchNorm2d) and not any(m.fused for m in unfused.modules()
                                                                 if isinstance(m, PackedLayer))
    # the dense tactic folds the norm too
    dense = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic='dense')
    assert dense.conv1.fused == {'norm': 'bn1', 'relu': 'relu'}
    with torch.no_grad():
        assert relative_error(dense(x), ref) < 1e-5


def test_pack_dense_tactic_is_bit_exact():
    model, x = folded_tiny(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    packed = pack(copy.deepcopy(model), PATTERNS, tactic='dense')  # no example: nothing fused
    assert set(tactics(packed).values()) == {'dense'}
    with torch.no_grad():
        assert torch.equal(packed(x), ref)


def test_auto_tactic_is_recorded_and_reproducible():
    model, x = folded_tiny(), torch.randn(1, 3, 16, 16)
    packed = pack(copy.deepcopy(model), PATTERNS, example_inputs=(x,), tactic='auto', repeats=3)
    chosen = tactics(packed)
    assert set(chosen) == set(PATTERNS) and set(chosen.values()) <= {'sparse', 'dense'}
    for name, layer in packed.named_modules():
        if name in PATTERNS:
            assert f'tactic={chosen[name]}' in repr(layer) and 'dense=' in repr(layer)
            assert set(layer.timings) == {'dense', 'sparse'}
    report = {r.name: r for r in packed.mmsparse_pack_report}
    assert report['conv1'].dense_ms > 0 and report['conv1'].sparse_ms > 0
    # forcing the recorded choices rebuilds the same model, without timing
    again = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic=chosen)
    assert tactics(again) == chosen and all(r.dense_ms is None for r in again.mmsparse_pack_report
                                            if r.tactic)
    with torch.no_grad():
        assert torch.equal(again(x), packed(x))


def test_auto_without_example_inputs_uses_default_shapes():
    packed = pack(folded_tiny(), {'conv3': '1:4'}, tactic='auto', repeats=1)
    assert tactics(packed)['conv3'] in ('sparse', 'dense')


def test_patterns_from_fold_meta():
    model, x = folded_tiny(), torch.randn(2, 3, 16, 16)
    declared = {'conv1': '1:16', 'conv2': '2:8', 'fc1': '2:8'}
    checkpoint = folded_checkpoint(model, declared)
    with torch.no_grad():
        ref = model(x)
    by_meta = pack(copy.deepcopy(model), checkpoint=checkpoint, example_inputs=x, tactic='sparse')
    by_specs = pack(copy.deepcopy(model), checkpoint_specs(checkpoint), tactic='sparse')
    assert set(tactics(by_meta)) == set(tactics(by_specs)) == set(declared)
    with torch.no_grad():
        assert relative_error(by_meta(x), ref) < 1e-5 and relative_error(by_specs(x), ref) < 1e-5


def test_violated_pattern_names_the_layer():
    model = folded_tiny()
    model.conv3.weight.data[0, :4, 0, 0] = 1.0  # 4 non-zeros in a 1:4 block
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PatternViolationError, match=r'conv3: block \(0, 0, 0, 0\) has 4 non-zeros'):
        pack(model, PATTERNS, tactic='sparse')
    assert isinstance(model.conv3, nn.Conv2d) and not isinstance(model.conv3, NMSparseConv2d)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_no_patterns_is_an_error():
    with pytest.raises(ValueError, match='pack needs the layer patterns'):
        pack(folded_tiny())
    with pytest.raises(ValueError, match='no .mmsparse_fold. meta'):
        pack(folded_tiny(), checkpoint=dict(state_dict={}))


def test_bad_declarations_are_errors():
    with pytest.raises(ValueError, match='not found in the model: layer9'):
        pack(folded_tiny(), {'layer9': '1:4'})
    with pytest.raises(ValueError, match='bad tactics'):
        pack(folded_tiny(), PATTERNS, tactic='fast')
    with pytest.raises(ValueError, match='undeclared layer'):
        pack(folded_tiny(), PATTERNS, tactic={'stem': 'sparse'})
    with pytest.raises(ValueError, match='invalid N:M pattern'):
        pack(folded_tiny(), {'conv1': '4:4'})


def test_uncovered_layer_stays_dense_and_is_reported():
    model, x = folded_tiny(), torch.randn(1, 3, 16, 16)
    packed = pack(model, {'grouped': '1:4', 'conv3': '1:4'}, example_inputs=x, tactic='sparse')
    assert type(packed.grouped) is nn.Conv2d and isinstance(packed.conv3, NMSparseConv2d)
    report = {r.name: r for r in packed.mmsparse_pack_report}
    assert report['grouped'].tactic is None and report['grouped'].reason == 'groups=2'
    assert 'left dense (groups=2)' in str(report['grouped'])


def test_packed_layers_are_inference_only():
    packed = pack(folded_tiny(), PATTERNS, tactic='sparse')
    with pytest.raises(RuntimeError, match='inference-only'):
        packed.conv1(torch.randn(1, 32, 8, 8, requires_grad=True))
    with pytest.raises(RuntimeError, match='float32 CPU'):
        packed.conv1(torch.randn(1, 32, 8, 8, dtype=torch.float64))


def test_state_round_trip_without_repacking():
    model, x = folded_tiny(), torch.randn(2, 3, 16, 16)
    mixed = {name: 'dense' if name == 'conv2' else 'sparse' for name in PATTERNS}
    packed = pack(copy.deepcopy(model), PATTERNS, example_inputs=x, tactic=mixed)
    state = packed.state_dict()
    assert 'bn1.running_mean' not in state  # folded into conv1
    fresh = load_packed(Tiny(), state)  # random init: everything comes from the packed state
    assert tactics(fresh) == tactics(packed) and isinstance(fresh.bn1, nn.Identity)
    assert isinstance(fresh.relu, FusedReLU) and fresh.conv1.fused == packed.conv1.fused
    with torch.no_grad():
        assert torch.equal(fresh(x), packed(x))
    assert weight_bytes(fresh) == weight_bytes(packed)
    # a packed model loads a packed state of the same architecture directly
    other = pack(folded_tiny(seed=1), PATTERNS, example_inputs=x, tactic=tactics(packed))
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), packed(x))


def test_packed_state_into_another_architecture_is_an_error():
    state = pack(folded_tiny(), PATTERNS, tactic='sparse').state_dict()
    with pytest.raises(ValueError, match=r'does not match the model at conv1: in_channels 32 in the state, '
                                         r'16 here'):
        load_packed(Tiny(width=16), state)
    wider = nn.Sequential()
    with pytest.raises(ValueError, match='it has no layer conv1'):
        load_packed(wider, state)
    with pytest.raises(ValueError, match='holds no mmsparse packed layer'):
        load_packed(Tiny(), Tiny().state_dict())
    with pytest.raises(ValueError, match='does not match this NMSparseConv2d: tactic'):
        pack(folded_tiny(), PATTERNS, tactic='dense').load_state_dict(state)


def test_mmdet_resnet_from_fold_meta():
    """A stock mmdet ResNet-18 backbone with folded 1:16 weights, patterns from the fold meta."""
    from mmdet.models.backbones import ResNet

    from mmsparse.core.patterns import nm_incompatibility
    torch.manual_seed(0)
    model = ResNet(depth=18, base_channels=16, out_indices=(0, 1, 2, 3))
    model.eval()  # mmdet's ResNet.train returns None
    declared = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and nm_incompatibility(module, 16) is None:
            module.weight.data = nm_weight(module.weight.shape, NMPattern(1, 16))
            declared[name] = '1:16'
    x = torch.randn(1, 3, 45, 61)
    with torch.no_grad():
        ref = model(x)
    packed = pack(model, checkpoint=folded_checkpoint(model, declared), example_inputs=x, tactic='sparse')
    assert len(tactics(packed)) == len(declared) == 19
    with torch.no_grad():
        for a, b in zip(packed(x), ref):
            assert relative_error(a, b) < 1e-4


def test_block_sparse_layer():
    """An SA++ block pattern ('block16@0.7') is verified and packed into BSR blocks."""
    from mmsparse.core.blocks import BlockPattern, expand_block_mask
    model, x = folded_tiny(), torch.randn(1, 3, 16, 16)
    weight = model.conv3.weight.data  # 64x64 view: a 4x4 grid of 16x16 blocks
    keep = torch.zeros(4, 4)
    keep[torch.arange(4), torch.arange(4)] = 1  # 75% of the blocks exactly zero
    model.conv3.weight.data = torch.randn_like(weight) * expand_block_mask(keep, weight.shape, 16)
    model_weight = model.conv3.weight.data.clone()
    with torch.no_grad():
        ref = model(x)
    packed = pack(model, {'conv3': BlockPattern(16, 0.7)}, example_inputs=x, tactic='sparse')
    assert isinstance(packed.conv3, BlockSparseConv2d) and packed.conv3.values.shape == (4, 16, 16)
    assert packed.conv3.pattern == 'block16@0.7' and torch.equal(packed.conv3.dense_weight(), model_weight)
    with torch.no_grad():
        assert relative_error(packed(x), ref) < 1e-5
    with pytest.raises(PatternViolationError, match='conv3: 0/16 blocks are exactly zero, 15 required'):
        pack(folded_tiny(), {'conv3': 'block16@0.9'})
