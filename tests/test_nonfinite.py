"""NaN/inf weights stop SA++ and CGMQ training and folding with one message naming the tensor; the
SA++ message when every block-sparse layer stayed dense."""
import math
import os.path as osp

import pytest
import torch
from helpers import run_tool, tiny_config
from mmengine.config import Config
from mmengine.model import BaseModel
from mmengine.registry import MODELS, init_default_scope
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

import mmsparse  # noqa: F401
from mmsparse.cgmq import CGMQConv2d, CGMQLinear, cgmq_layers
from mmsparse.core import NonFinite, check_finite, find_nonfinite, layer_tensors, nonfinite_message
from mmsparse.export import fold_checkpoint, verify_checkpoint
from mmsparse.sapp import SAPPLinear

SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'
CGMQ = 'configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'
SAPP_HOOK = dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparsify=0, cycles=1,
                 interval=1)
CGMQ_HOOK = dict(type='CGMQHook', budget_relative=16 / 1024, input_shape=(3, 96, 96),
                 num_rois=16, calib_batches=1, interval=1)
LAYER = 'backbone.layer2.0.conv1'   # a 3x3 conv: block-sparse at B=16, a CGMQ layer


# -- the helper on hand-made modules ----------------------------------------------------------------
class _Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)     # running stats and an integer num_batches_tracked
        self.sparse = SAPPLinear(16, 16, block_size=4, min_blocks=4)
        self.dense = SAPPLinear(16, 16, block_size=4, min_blocks=100)   # no logits


def test_find_nonfinite_counts_bad_values_of_float_tensors_only():
    net = _Net()
    assert find_nonfinite(net) == []
    with torch.no_grad():
        net.fc.weight[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        net.bn.running_var[1] = math.nan
        net.sparse.block_logits[2, 3] = math.inf
    net.bn.num_batches_tracked.fill_(7)
    assert find_nonfinite(net) == [NonFinite('fc.weight', 3), NonFinite('bn.running_var', 1),
                                   NonFinite('sparse.block_logits', 1)]
    # a state dict and (name, tensor) pairs give the same
    assert find_nonfinite(net.state_dict()) == find_nonfinite(net)
    assert find_nonfinite([('x', torch.ones(2)), ('y', torch.full((2, 2), math.nan)),
                           ('i', torch.zeros(3, dtype=torch.long)), ('e', torch.empty(0))]) \
        == [NonFinite('y', 4)]


def test_layer_tensors_skip_missing_and_none():
    net = _Net()
    named = layer_tensors([('sparse', net.sparse), ('dense', net.dense), ('fc', net.fc)],
                          ('weight', 'block_logits'))
    assert [n for n, _ in named] == ['sparse.weight', 'sparse.block_logits', 'dense.weight',
                                     'fc.weight']
    assert named[1][1] is net.sparse.block_logits


def test_message_names_first_tensors_with_counts():
    one = nonfinite_message('MyHook', [NonFinite('a.weight', 2)], 7, 'do this')
    assert one == 'MyHook: a.weight holds 2 NaN/inf values at iteration 7; do this'
    bad = [NonFinite(f't{i}.weight', i + 1) for i in range(5)]
    assert nonfinite_message('fold', bad) == (
        'fold: t0.weight holds 1 NaN/inf values (and 4 more tensor(s): t1.weight (2), '
        't2.weight (3), ... 2 more)')
    assert nonfinite_message('fold', bad[:2]) == (
        'fold: t0.weight holds 1 NaN/inf values (and 1 more tensor(s): t1.weight (2))')


def test_check_finite_raises_floating_point_error():
    net = _Net()
    check_finite('MyHook', net, 3)   # finite: silent
    with torch.no_grad():
        net.dense.weight[1, 1] = math.inf
    with pytest.raises(FloatingPointError,
                       match=r'^MyHook: dense\.weight holds 1 NaN/inf values at iteration 3; x$'):
        check_finite('MyHook', layer_tensors([('dense', net.dense)]), 3, 'x')


# -- the hooks in mmengine's Runner on toy models ---------------------------------------------------
class _Data(Dataset):
    """12 samples (3 batches of 4); from ``nan_from`` on the inputs are NaN (a diverging run)."""

    def __init__(self, nan_from=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(12, 16, generator=g)
        self.y = torch.randn(12, 8, generator=g)
        if nan_from is not None:
            self.x[nan_from:] = math.nan

    def __len__(self):
        return 12

    def __getitem__(self, idx):
        return dict(inputs=self.x[idx], targets=self.y[idx])


class _SAPPToy(BaseModel):

    def __init__(self, block_size=4):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = SAPPLinear(16, 16, block_size=block_size, min_blocks=4)
        self.fc2 = SAPPLinear(16, 8, block_size=block_size, min_blocks=4)

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.fc2(torch.relu(self.fc1(inputs)))
        if mode == 'loss':
            return dict(loss=(out - targets).pow(2).mean())
        return out


class _CGMQToy(BaseModel):

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = CGMQConv2d(1, 4, 3, padding=1)
        self.fc = CGMQLinear(64, 8)

    def forward(self, inputs, targets=None, mode='tensor'):
        out = self.fc(torch.relu(self.conv(inputs.view(-1, 1, 4, 4))).flatten(1))
        if mode == 'loss':
            return dict(loss=(out - targets).pow(2).mean())
        return out


def _runner(tmp_path, model, hook, data=None, load_from=None, max_iters=6):
    return Runner(
        model=model, work_dir=str(tmp_path), experiment_name='_'.join(tmp_path.parts[-2:]),
        train_dataloader=dict(dataset=data or _Data(),
                              sampler=dict(type='InfiniteSampler', shuffle=False), batch_size=4,
                              num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        custom_hooks=[hook],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        log_processor=dict(by_epoch=False), randomness=dict(seed=0), load_from=load_from)


TOY_SAPP_HOOK = dict(type='SequentialAttentionHook', sparsity=0.5, warmup=1, sparsify=0, cycles=1,
                     interval=1)
TOY_CGMQ_HOOK = dict(type='CGMQHook', budget_relative=0.5, input_shape=(1, 16, 1), calib_batches=1,
                     interval=1)


def _bad_checkpoint(tmp_path, model, key, index, value):
    state = model.state_dict()
    state[key][index] = value
    path = str(tmp_path / 'bad.pth')
    torch.save(dict(state_dict=state), path)
    return path


@pytest.mark.parametrize('key,index,value', [('fc2.weight', (1, 2), math.nan),
                                             ('fc1.block_logits', (0, 3), -math.inf)])
def test_sapp_refuses_nonfinite_checkpoint_before_the_first_step(tmp_path, key, index, value):
    ckpt = _bad_checkpoint(tmp_path, _SAPPToy(), key, index, value)
    runner = _runner(tmp_path / 'wd', _SAPPToy(), TOY_SAPP_HOOK, load_from=ckpt)
    with pytest.raises(FloatingPointError) as err:
        runner.train()
    assert str(err.value).startswith(f'SequentialAttentionHook: {key} holds 1 NaN/inf values at '
                                     'iteration 0; refusing to select blocks')
    assert not runner.optim_wrapper.optimizer.state   # no optimizer step was taken
    assert runner.model.fc1.n_pruned == runner.model.fc2.n_pruned == 0


@pytest.mark.parametrize('interval', [1, 50])
def test_sapp_stops_at_the_step_that_diverged(tmp_path, interval):
    """Weights are checked at log intervals, and at once after a step whose loss is not finite."""
    # batches of 4 without shuffling: iteration 2 is the first with NaN inputs
    hook = dict(TOY_SAPP_HOOK, interval=interval)
    runner = _runner(tmp_path, _SAPPToy(), hook, data=_Data(nan_from=8))
    with pytest.raises(FloatingPointError,
                       match=r'^SequentialAttentionHook: fc1\.weight holds \d+ NaN/inf values at '
                             r'iteration 2 \(and \d+ more tensor\(s\): .*training diverged'):
        runner.train()
    # the hook (NORMAL) stops before the CheckpointHook (VERY_LOW) saves the NaN weights
    assert osp.isfile(tmp_path / 'iter_2.pth') and not osp.exists(tmp_path / 'iter_3.pth')


@pytest.mark.parametrize('key,index,value', [('fc.weight', (3, 5), math.inf),
                                             ('conv.act_gate', (1, ), math.nan),
                                             ('conv.weight_range', (2, ), math.nan)])
def test_cgmq_refuses_nonfinite_checkpoint_before_calibration(tmp_path, key, index, value):
    ckpt = _bad_checkpoint(tmp_path, _CGMQToy(), key, index, value)
    runner = _runner(tmp_path / 'wd', _CGMQToy(), TOY_CGMQ_HOOK, load_from=ckpt)
    with pytest.raises(FloatingPointError) as err:
        runner.train()
    assert str(err.value).startswith(f'CGMQHook: {key} holds 1 NaN/inf values at iteration 0; '
                                     'refusing to calibrate')
    assert not any(bool(layer.calibrated) for _, layer in cgmq_layers(runner.model))
    assert not runner.optim_wrapper.optimizer.state


@pytest.mark.parametrize('interval,first', [(1, 'conv.weight'), (50, 'conv.weight_gate')])
def test_cgmq_stops_at_the_step_that_diverged(tmp_path, interval, first):
    """Everything is checked at log intervals; in between the gates that every BOPs count reads."""
    hook = dict(TOY_CGMQ_HOOK, interval=interval)
    runner = _runner(tmp_path, _CGMQToy(), hook, data=_Data(nan_from=8))
    with pytest.raises(FloatingPointError,
                       match=rf'^CGMQHook: {first} holds \d+ NaN/inf values at iteration 2'):
        runner.train()
    assert not osp.exists(tmp_path / 'iter_3.pth')


def test_sapp_names_layers_that_all_stayed_dense(tmp_path):
    runner = _runner(tmp_path, _SAPPToy(block_size=7), TOY_SAPP_HOOK)
    with pytest.raises(RuntimeError) as err:
        runner.train()
    message = str(err.value)
    assert message.startswith('SequentialAttentionHook: the model has 2 SAPPLinear layers but none '
                              'can be pruned: 2 stayed dense (fc1: 16x16 view not divisible by B=7; '
                              'fc2: 8x16 view not divisible by B=7)')
    assert 'block_size' in message and 'set conv_cfg' not in message


# -- end to end: tools/train.py and tools/fold.py -----------------------------------------------------
def _build(base, tiny_coco, tmp_path):
    init_default_scope('mmdet')
    cfg_path = tiny_config(base, tiny_coco, str(tmp_path / 'build'), load_from=None)
    return cfg_path, MODELS.build(Config.fromfile(cfg_path).model)


def _train(base, tiny_coco, tmp_path, **updates):
    cfg = tiny_config(base, tiny_coco, str(tmp_path / 'wd'), max_iters=2,
                      **{'load_from': None, **updates})
    proc = run_tool('train.py', [cfg], check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('route', ['load_from', 'init_cfg'])
@pytest.mark.parametrize('base,hook,backbone', [(SAPP, SAPP_HOOK, 'model.backbone'),
                                                (CGMQ, CGMQ_HOOK, 'model.model.backbone')])
def test_train_refuses_a_nan_backbone_weight(tiny_coco, tmp_path, base, hook, backbone, route):
    """``load_from`` is also refused by the pre-flight checks of tools/train.py; a NaN pretrained
    backbone (``init_cfg``) is loaded by the runner and reaches the hook's check."""
    _, model = _build(base, tiny_coco, tmp_path)
    state = model.state_dict()
    state[f'{LAYER}.weight'][0, 0, 0, 0] = math.nan
    ckpt = str(tmp_path / 'nan.pth')
    torch.save(dict(state_dict=state), ckpt)
    if route == 'load_from':
        updates = dict(load_from=ckpt)
    else:
        updates = {f'{backbone}.init_cfg': dict(_delete_=True, type='Pretrained', checkpoint=ckpt,
                                                prefix='backbone.')}
    code, log = _train(base, tiny_coco, tmp_path, custom_hooks=[hook], **updates)
    assert code != 0 and f'{LAYER}.weight' in log and 'NaN' in log, log[-3000:]
    assert 'Iter(train)' not in log
    if route == 'init_cfg':
        assert (f'{hook["type"]}: {LAYER}.weight holds 1 NaN/inf values at iteration 0; '
                'refusing') in log, log[-3000:]


@pytest.mark.slow
def test_train_sapp_block_size_7_says_every_layer_stayed_dense(tiny_coco, tmp_path):
    # preflight: accept the all-dense pattern there, so that the hook's own message is the one shown
    code, log = _train(SAPP, tiny_coco, tmp_path, custom_hooks=[SAPP_HOOK],
                       preflight=dict(max_dense_share=1.0),
                       **{'model.backbone.conv_cfg': dict(type='SAPPConv2d', block_size=7)})
    assert code != 0 and 'SAPPConv2d layers but none can be pruned' in log, log[-3000:]
    assert 'stayed dense (backbone.conv1: 64x147 view not divisible by B=7' in log
    assert 'set conv_cfg' not in log and 'Iter(train)' not in log


@pytest.fixture(scope='module')
def sapp_state(tiny_coco, tmp_path_factory):
    """The tiny SA++ config and the state dict of its freshly built model (finite, foldable)."""
    cfg_path, model = _build(SAPP, tiny_coco, tmp_path_factory.mktemp('sapp_state'))
    return cfg_path, model.state_dict()


def _corrupt(state, how):
    state = {k: v.clone() for k, v in state.items()}
    if how == 'all NaN':
        for value in state.values():
            if value.is_floating_point():
                value.fill_(math.nan)
    else:
        state[f'{LAYER}.weight'][3, 2, 1, 0] = math.inf
    return state


def test_fold_api_refuses_nan_and_writes_nothing(sapp_state, tmp_path):
    cfg_path, state = sapp_state
    ckpt = str(tmp_path / 'bad.pth')
    torch.save(dict(state_dict=_corrupt(state, 'one inf')), ckpt)
    with pytest.raises(FloatingPointError,
                       match=rf'^fold: {LAYER}\.weight holds 1 NaN/inf values; refusing to fold'):
        fold_checkpoint(cfg_path, ckpt, str(tmp_path / 'out'))
    assert not osp.exists(tmp_path / 'out')


@pytest.mark.slow
@pytest.mark.parametrize('how,first', [('all NaN', 'backbone.conv1.weight holds 9408 NaN/inf '
                                                   'values (and '),
                                       ('one inf', f'{LAYER}.weight holds 1 NaN/inf values; ')])
def test_fold_tool_refuses_nonfinite_checkpoint(sapp_state, tmp_path, how, first):
    cfg_path, state = sapp_state
    ckpt = str(tmp_path / 'bad.pth')
    torch.save(dict(state_dict=_corrupt(state, how)), ckpt)
    out = tmp_path / 'out'
    proc = run_tool('fold.py', [cfg_path, ckpt, '--out-dir', str(out)], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f'refused to fold {ckpt}: fold: {first}' in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_verify_reports_nonfinite_folded_weights(sapp_state, tmp_path):
    cfg_path, state = sapp_state
    ckpt = str(tmp_path / 'ok.pth')
    torch.save(dict(state_dict=state), ckpt)
    result = fold_checkpoint(cfg_path, ckpt, str(tmp_path / 'out'))
    assert verify_checkpoint(result.checkpoint)[0] == []
    folded = torch.load(result.checkpoint, map_location='cpu', weights_only=True)
    folded['state_dict'][f'{LAYER}.weight'][0, 0, 0, 0] = math.inf
    folded['state_dict']['backbone.bn1.running_var'][:2] = math.nan
    bad = str(tmp_path / 'bad_folded.pth')
    torch.save(folded, bad)
    violations, _ = verify_checkpoint(bad)
    assert violations[:2] == [NonFinite('backbone.bn1.running_var', 2),
                              NonFinite(f'{LAYER}.weight', 1)]
    proc = run_tool('fold.py', ['--verify', bad], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert '2 tensor(s) hold NaN/inf' in proc.stderr
    assert f'{LAYER}.weight holds 1 NaN/inf values' in proc.stderr
