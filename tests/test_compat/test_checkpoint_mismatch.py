"""A checkpoint of one compression method loaded into a model of another is refused up front, with
one message that names both layer types and a key."""
import os

import pytest
import torch
from helpers import run_tool, tiny_config
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

import mmsparse  # noqa: F401  registers the layers
from mmsparse.cgmq import CGMQConv2d, CGMQLinear
from mmsparse.compat import (CheckpointMismatchError, check_compression_matches,
                             compression_layer_types)
from mmsparse.maxq import (MaxQConv2d, MaxQLinear, OneShotNMConv2d, OneShotNMLinear, SRSTEConv2d,
                           SRSTELinear)
from mmsparse.sapp import MagnitudeBlockConv2d, MagnitudeBlockLinear, SAPPConv2d, SAPPLinear

DENSE = 'configs/demo/dense_mask-rcnn_r18_fpn_demo.py'
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'
CGMQ = 'configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'
SAPP_HOOK = dict(type='SequentialAttentionHook', sparsity=0.7, interval=1, phases=[
    dict(type='dense', begin=0, end=1), dict(type='sparse', begin=1, end=None)])
LAYER = 'backbone.layer1.0.conv1'   # a 3x3 conv every method compresses (144 blocks at B=16)

LAYERS = [(MaxQConv2d, (32, 32, 3), dict(n=1, m=16)), (MaxQLinear, (32, 32), dict(n=1, m=16)),
          (SRSTEConv2d, (32, 32, 3), dict(n=1, m=16)), (SRSTELinear, (32, 32), dict(n=1, m=16)),
          (OneShotNMConv2d, (32, 32, 3), dict(n=1, m=16)),
          (OneShotNMLinear, (32, 32), dict(n=1, m=16)),
          (SAPPConv2d, (16, 16, 3), dict(block_size=16, min_blocks=1)),
          (SAPPLinear, (32, 32), dict(block_size=16, min_blocks=1)),
          (MagnitudeBlockConv2d, (16, 16, 3), dict(block_size=16, min_blocks=1)),
          (MagnitudeBlockLinear, (32, 32), dict(block_size=16, min_blocks=1)),
          (CGMQConv2d, (16, 16, 3), {}), (CGMQLinear, (16, 16), {})]


def test_every_compressed_layer_type_is_found_through_the_registry():
    assert set(compression_layer_types()) == {cls for cls, _, _ in LAYERS}


@pytest.mark.parametrize('cls, args, kwargs', LAYERS, ids=[cls.__name__ for cls, _, _ in LAYERS])
def test_compression_state_is_what_the_layer_adds_to_the_torch_layer(cls, args, kwargs):
    layer = cls(*args, **kwargs)
    assert set(layer.state_dict()) - {'weight', 'bias'} == set(cls.compression_state)
    assert compression_layer_types()[cls] == cls.compression_state


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """The tiny demo models of each method, built once (no data is read)."""
    init_default_scope('mmdet')
    root = tmp_path_factory.mktemp('models')
    return {name: MODELS.build(Config.fromfile(
        tiny_config(base, str(root / 'data'), str(root / name))).model)
        for name, base in dict(dense=DENSE, maxq=MAXQ, sapp=SAPP, cgmq=CGMQ).items()}


def _check(models, saved: str, built: str, resume: bool) -> str:
    with pytest.raises(CheckpointMismatchError) as err:
        check_compression_matches(models[built], models[saved].state_dict(), 'ckpt.pth', resume)
    return str(err.value)


def test_sapp_checkpoint_into_maxq_model_names_both_layer_types_and_a_key(models):
    message = _check(models, 'sapp', 'maxq', resume=True)
    assert message.startswith(
        f'checkpoint ckpt.pth was trained with SAPPConv2d layers (keys {LAYER}.block_logits, '
        f'{LAYER}.support, ...) but the config builds MaxQConv2d layers ({LAYER}.mask missing from '
        'the checkpoint); ')
    assert message.endswith('resume needs the same method; to fine-tune from it with another '
                            'method, fold it first (tools/fold.py) and use load_from')
    message = _check(models, 'sapp', 'maxq', resume=False)
    assert 'SAPPConv2d' in message and f'{LAYER}.mask missing' in message
    assert 'load_from takes plain weights or a checkpoint of the same method' in message


@pytest.mark.parametrize('saved, built, names', [
    ('maxq', 'sapp', (r'MaxQConv2d/OneShotNMConv2d/SRSTEConv2d layers \(keys backbone.layer1.0.'
                      r'conv1.mask, ...\) but the config builds SAPPConv2d layers')),
    ('cgmq', 'sapp', r'CGMQConv2d layers \(keys .*act_gate.* but the config builds SAPPConv2d'),
    ('maxq', 'dense', r'MaxQConv2d.* but the config builds plain Conv2d layers \(no place for '
                      r'backbone.conv1.mask\)'),
    ('cgmq', 'maxq', r'CGMQConv2d layers .* but the config builds MaxQConv2d layers \(backbone.'
                     r'conv1.mask missing from the checkpoint\)'),
    ('sapp', 'cgmq', r'SAPPConv2d .* but the config builds CGMQConv2d layers')])
def test_other_method_or_plain_model_is_refused_for_load_from_and_resume(models, saved, built,
                                                                          names):
    for resume in (False, True):
        with pytest.raises(CheckpointMismatchError, match=names):
            check_compression_matches(models[built], models[saved].state_dict(), 'c.pth', resume)


def test_same_method_and_plain_weights_for_load_from_pass(models):
    for name in ('dense', 'maxq', 'sapp', 'cgmq'):
        for resume in (False, True):
            check_compression_matches(models[name], models[name].state_dict(), 'c.pth', resume)
    dense = models['dense'].state_dict()
    for name in ('maxq', 'sapp', 'cgmq'):
        check_compression_matches(models[name], dense, 'dense.pth', resume=False)


def test_resuming_plain_weights_into_a_compressed_model_points_to_load_from(models):
    message = _check(models, 'dense', 'sapp', resume=True)
    assert f'holds plain layers (no compression state for {LAYER})' in message
    assert f'builds SAPPConv2d layers ({LAYER}.block_logits missing from the checkpoint)' in message
    assert message.endswith('use load_from instead of --resume')


def test_dense_by_rule_layer_and_unknown_state_combinations_are_named(models):
    maxq = models['maxq'].state_dict()
    stem = {k: maxq[k] for k in ('backbone.conv1.weight', 'backbone.conv1.mask')}
    with pytest.raises(CheckpointMismatchError, match=r'builds SAPPConv2d layers \(dense here: no '
                                                      r'place for backbone.conv1.mask\)'):
        check_compression_matches(models['sapp'], stem, 'stem.pth', resume=False)
    no_support = {k: v for k, v in models['sapp'].state_dict().items()
                  if not k.endswith('.support')}
    with pytest.raises(CheckpointMismatchError, match=r'trained with compressed \(with '
                                                      r'block_logits\) layers'):
        check_compression_matches(models['sapp'], no_support, 'odd.pth', resume=False)


# -- through tools/train.py ------------------------------------------------------------------------
def _tree(path: str) -> dict:
    """Every file under ``path`` with its size and modification time."""
    files = (os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    return {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}


def _refused(tiny_coco, tmp_path, ckpt: str, args=(), **updates) -> str:
    """train.py with the MaxQ config fails before any iteration and writes nothing near ``ckpt``."""
    before = _tree(os.path.dirname(ckpt))
    cfg = tiny_config(MAXQ, tiny_coco, str(tmp_path / 'maxq'), max_iters=2, **updates)
    proc = run_tool('train.py', [cfg, *args], check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2 and 'Traceback' not in log, log[-3000:]   # refused in pre-flight
    assert 'Iter(train)' not in log
    assert _tree(os.path.dirname(ckpt)) == before
    assert os.listdir(tmp_path / 'maxq') == ['tiny_config.py']
    return log


@pytest.mark.slow
def test_load_from_an_sapp_checkpoint_with_the_maxq_config(tiny_coco, tmp_path, models):
    ckpt = tmp_path / 'sapp' / 'sapp.pth'
    ckpt.parent.mkdir()
    torch.save(dict(state_dict=models['sapp'].state_dict()), ckpt)
    log = _refused(tiny_coco, tmp_path, str(ckpt), load_from=str(ckpt))
    assert (f'checkpoint {ckpt} was trained with SAPPConv2d layers (keys {LAYER}.block_logits'
            in log), log[-3000:]
    assert f'the config builds MaxQConv2d layers ({LAYER}.mask missing from the checkpoint)' in log


@pytest.mark.slow
def test_resume_of_an_sapp_run_with_the_maxq_config(tiny_coco, tmp_path):
    sapp_dir = tmp_path / 'sapp_run'
    cfg = tiny_config(SAPP, tiny_coco, str(sapp_dir), max_iters=2, ckpt_interval=1,
                      custom_hooks=[SAPP_HOOK], load_from=None)
    run_tool('train.py', [cfg])
    ckpt = sapp_dir / 'iter_1.pth'
    log = _refused(tiny_coco, tmp_path, str(ckpt), args=['--resume', str(ckpt)], load_from=None)
    assert (f'checkpoint {ckpt} was trained with SAPPConv2d layers (keys {LAYER}.block_logits'
            in log), log[-3000:]
    assert f'MaxQConv2d layers ({LAYER}.mask missing from the checkpoint)' in log
    assert 'resume needs the same method' in log and 'tools/fold.py' in log
