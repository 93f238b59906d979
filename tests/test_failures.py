"""Catalogue of bad inputs: each fails before training (or at the step where it occurs) with one
clear message, through the real tools/train.py."""
import json
import os

import pytest
import torch
from helpers import run_tool, tiny_config

pytestmark = pytest.mark.slow
MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
CGMQ = 'configs/cgmq/cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'


def _train(tiny_coco, tmp_path, base=MAXQ, args=(), **updates):
    cfg = tiny_config(base, tiny_coco, str(tmp_path / 'wd'), max_iters=2,
                      **{'load_from': None, **updates})
    proc = run_tool('train.py', [cfg, *args], check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _refused_before_work(tiny_coco, tmp_path, message, base=MAXQ, args=(), **updates):
    """tools/train.py exits 2 with ``error: ...message...``, no traceback, nothing written."""
    code, log = _train(tiny_coco, tmp_path, base=base, args=args, **updates)
    assert code == 2 and message in log, log[-3000:]
    assert 'Traceback' not in log and log.strip().startswith('error: ')
    assert os.listdir(tmp_path / 'wd') == ['tiny_config.py']


def _model_state(tiny_coco, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(tiny_config(MAXQ, tiny_coco, str(tmp_path / 'build')))
    return MODELS.build(cfg.model).state_dict()


CASES = {
    'invalid N:M': (dict(**{'model.backbone.conv_cfg': dict(type='MaxQConv2d', n=0, m=16)}),
                    'invalid N:M pattern 0:16'),
    'unknown schedule': (dict(custom_hooks=[dict(type='MaxQHook', schedule='step')]),
                         'unknown preserve-rate schedule'),
    'end before start': (dict(custom_hooks=[dict(type='MaxQHook', start=5, end=2)]),
                         'start <= end'),
    'channels not divisible': (dict(model=dict(
        _delete_=False, backbone=dict(conv_cfg=dict(type='MaxQConv2d', n=1, m=16,
                                                    incompatible='error')))),
        'cannot take the 1:16 pattern: the 3-channel stem is dense by rule'),
    'missing checkpoint': (dict(load_from='/nonexistent/dense.pth'), 'does not exist'),
    'two methods on one layer': (dict(model=dict(
        _delete_=True, type='ConvertedModel', model=None,
        rules=[dict(include=r'backbone\.layer1\.0\.conv1',
                    layer=dict(type='SRSTEConv2d', n=1, m=16))])), 'already a MaxQConv2d'),
}


METHOD_CASES = {
    'CGMQ budget below the all-2-bit model': (CGMQ, dict(custom_hooks=[dict(
        type='CGMQHook', budget_relative=1e-6, input_shape=(3, 96, 96), num_rois=16)]),
        'all-2-bit'),
    'CGMQ relative budget above 1': (CGMQ, dict(custom_hooks=[dict(
        type='CGMQHook', budget_relative=1.5, input_shape=(3, 96, 96))]), 'must be in (0, 1]'),
    'SA++ block size not dividing': (SAPP, {'model.backbone.conv_cfg': dict(
        type='SAPPConv2d', block_size=48, min_blocks=1, incompatible='error')}, 'cannot take'),
    'SA++ sparsity outside (0, 1)': (SAPP, dict(custom_hooks=[dict(
        type='SequentialAttentionHook', sparsity=1.2, warmup=1, sparsify=1, sparse=1, dense=1,
        cycles=1)]), 'must be a number in (0, 1)'),
    'SA++ overlapping phases': (SAPP, dict(custom_hooks=[dict(
        type='SequentialAttentionHook', sparsity=0.7, phases=[
            dict(type='dense', begin=0, end=2), dict(type='sparse', begin=1, end=None)])]),
        'overlapping phases'),
}


@pytest.mark.parametrize('name', list(METHOD_CASES))
def test_method_config_errors(name, tiny_coco, tmp_path):
    base, updates, message = METHOD_CASES[name]
    code, log = _train(tiny_coco, tmp_path, base=base, **updates)
    assert code != 0 and message in log, log[-3000:]
    assert 'Iter(train)' not in log


@pytest.mark.parametrize('name', list(CASES))
def test_config_errors(name, tiny_coco, tmp_path):
    updates, message = CASES[name]
    if name == 'two methods on one layer':
        from mmengine.config import Config
        base = Config.fromfile(tiny_config(MAXQ, tiny_coco, str(tmp_path / 'base')))
        updates['model']['model'] = base.model.to_dict()
    code, log = _train(tiny_coco, tmp_path, **updates)
    assert code != 0 and message in log, log[-3000:]
    assert 'Iter(train)' not in log


def test_corrupted_checkpoint(tiny_coco, tmp_path):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'PK\x03\x04 not a checkpoint')
    code, log = _train(tiny_coco, tmp_path, load_from=str(bad))
    assert code != 0 and 'corrupted or truncated' in log and 'Iter(train)' not in log


def test_checkpoint_of_another_architecture(tiny_coco, tmp_path):
    ckpt = tmp_path / 'other.pth'
    torch.save(dict(state_dict={'backbone.conv1.weight': torch.zeros(8, 3, 3, 3)}), ckpt)
    code, log = _train(tiny_coco, tmp_path, load_from=str(ckpt))
    assert code != 0 and 'does not fit the model' in log and 'backbone.conv1.weight' in log


def test_nan_weights_name_the_layer(tiny_coco, tmp_path):
    state = _model_state(tiny_coco, tmp_path)
    state['backbone.layer2.0.conv1.weight'][0, 0, 0, 0] = float('nan')
    ckpt = tmp_path / 'nan.pth'
    torch.save(dict(state_dict=state), ckpt)
    code, log = _train(tiny_coco, tmp_path, load_from=str(ckpt))
    assert code != 0 and 'backbone.layer2.0.conv1.weight holds 1 NaN/inf values' in log
    assert 'Iter(train)' not in log


def test_empty_dataset(tiny_coco, tmp_path):
    root = tmp_path / 'empty'
    (root / 'annotations').mkdir(parents=True)
    src = json.loads(open(f'{tiny_coco}/annotations/instances_train.json').read())
    empty = dict(images=[], annotations=[], categories=src['categories'])
    for split in ('train', 'val'):
        (root / 'annotations' / f'instances_{split}.json').write_text(json.dumps(empty))
        (root / split).mkdir()
    cfg = tiny_config(MAXQ, str(root), str(tmp_path / 'wd'), max_iters=2, load_from=None)
    proc = run_tool('train.py', [cfg], check=False, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2 and 'dataset is empty' in log.lower(), log[-3000:]


PREFLIGHT_CASES = {
    'pattern leaving the targets dense': (
        {'model.backbone.conv_cfg': dict(type='MaxQConv2d', n=2, m=3)},
        'leaves 20 of the 20 targeted layers dense'),
    'SA++ block size leaving the targets dense': (
        {'base': SAPP, 'model.backbone.conv_cfg.block_size': 7}, 'targeted layers dense'),
    'resume from a missing file': (dict(args=['--resume', '/nonexistent/iter_4.pth']),
                                   '--resume /nonexistent/iter_4.pth: the checkpoint does not exist'),
    'unknown hook schedule': (dict(custom_hooks=[dict(type='MaxQHook', schedule='step')]),
                              'custom_hooks[0] (MaxQHook): unknown preserve-rate schedule'),
}


@pytest.mark.parametrize('name', list(PREFLIGHT_CASES))
def test_refused_before_work(name, tiny_coco, tmp_path):
    updates, message = PREFLIGHT_CASES[name]
    _refused_before_work(tiny_coco, tmp_path, message, **updates)


def test_empty_annotation_file_is_named(tiny_coco, tmp_path):
    root = tmp_path / 'data'
    (root / 'annotations').mkdir(parents=True)
    os.symlink(f'{tiny_coco}/train', root / 'train')
    os.symlink(f'{tiny_coco}/val', root / 'val')
    (root / 'annotations' / 'instances_train.json').write_bytes(b'')
    cfg = tiny_config(MAXQ, str(root), str(tmp_path / 'wd'), max_iters=2, load_from=None)
    proc = run_tool('train.py', [cfg], check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2 and 'Traceback' not in log, log[-3000:]
    assert f"annotation file '{root}/annotations/instances_train.json'" in log and '0 bytes' in log
    assert os.listdir(tmp_path / 'wd') == ['tiny_config.py']


def test_resume_in_a_fresh_work_dir_starts_from_load_from(tiny_coco, tmp_path):
    state = _model_state(tiny_coco, tmp_path)
    ckpt = tmp_path / 'dense.pth'
    torch.save(dict(state_dict=state), ckpt)
    code, log = _train(tiny_coco, tmp_path, args=['--resume'], load_from=str(ckpt))
    assert code == 0, log[-3000:]
    assert f'--resume: no checkpoint in {tmp_path / "wd"} yet; starting a new run from ' \
           f'load_from={ckpt}' in log
    assert f'Load checkpoint from {ckpt}' in log


CANONICAL = 'configs/maxq_mask-rcnn_r50_1-16.py'


@pytest.mark.skipif(os.path.exists(os.path.join(os.path.dirname(__file__), '..', 'data', 'coco')),
                    reason='data/coco exists here')
def test_canonical_command_without_coco_names_data_coco():
    proc = run_tool('train.py', [CANONICAL], check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "data root 'data/coco/'" in proc.stderr, out[-3000:]
    assert 'Traceback' not in out and len(out.splitlines()) < 60


def test_canonical_config_on_data_without_its_classes(tiny_coco, tmp_path):
    options = [f'{split}_dataloader.dataset.{key}={value}' for split in ('train', 'val')
               for key, value in (('data_root', f'{tiny_coco}/'),
                                  ('ann_file', f'annotations/instances_{split}.json'),
                                  ('data_prefix.img', f'{split}/'))]
    options.append(f'val_evaluator.ann_file={tiny_coco}/annotations/instances_val.json')
    proc = run_tool('train.py', [CANONICAL, '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
                                 *options], check=False, timeout=120)
    assert proc.returncode == 2 and 'empty after class filtering' in proc.stderr, proc.stderr[-3000:]
    assert "'person'" in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'wd').exists()
