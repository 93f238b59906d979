"""Pre-flight checks (mmsparse.engine.preflight) on tiny configs, in-process."""
import json
import os

import pytest
import torch
from helpers import tiny_config
from mmengine.config import Config

from mmsparse.engine.preflight import (PreflightError, PreflightReport, check_checkpoint,
                                       check_compression, check_data, check_hooks, check_train,
                                       resolve_resume)

MAXQ = 'configs/demo/maxq_mask-rcnn_r18_1-16_demo.py'
SAPP = 'configs/sapp/demo/sapp_mask-rcnn_r18_fpn_b16-70_demo.py'


def _cfg(tiny_coco, tmp_path, base=MAXQ, **updates) -> Config:
    return Config.fromfile(tiny_config(base, tiny_coco, str(tmp_path / 'wd'),
                                       **{'load_from': None, **updates}))


def test_shipped_demo_config_passes(tiny_coco, tmp_path):
    report = check_train(_cfg(tiny_coco, tmp_path), None)
    assert report.warnings == []
    assert report.notes == ['1 of 20 targeted layers stay dense: backbone.conv1: the 3-channel '
                            'stem is dense by rule']


def test_resume_without_checkpoint_keeps_load_from(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, load_from='dense.pth')
    report = PreflightReport()
    resolve_resume(cfg, 'auto', report)
    assert cfg.load_from == 'dense.pth' and not cfg.resume
    assert 'no checkpoint in' in report.notes[0] and 'load_from=dense.pth' in report.notes[0]


def test_resume_after_a_kill_that_emptied_last_checkpoint(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path)
    for name in ('iter_2.pth', 'iter_10.pth', 'iter_4.pth'):
        (tmp_path / 'wd' / name).write_bytes(b'')
    (tmp_path / 'wd' / 'last_checkpoint').write_text('')
    report = PreflightReport()
    resolve_resume(cfg, 'auto', report)
    assert cfg.resume and cfg.load_from == str(tmp_path / 'wd' / 'iter_10.pth')
    assert "names '', which does not exist" in report.notes[0]


def test_resume_picks_the_latest_checkpoint(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, load_from='dense.pth')
    ckpt = tmp_path / 'wd' / 'iter_2.pth'
    ckpt.write_bytes(b'')
    (tmp_path / 'wd' / 'last_checkpoint').write_text(str(ckpt))
    report = PreflightReport()
    resolve_resume(cfg, 'auto', report)
    assert cfg.resume and cfg.load_from == str(ckpt)
    with pytest.raises(PreflightError, match='--resume nope.pth: the checkpoint does not exist'):
        resolve_resume(cfg, 'nope.pth', report)


@pytest.mark.parametrize('content,message', [
    (b'', r'is empty \(0 bytes\)'),
    (b'{"images": [', 'is not valid JSON'),
    (b'{"images": [], "annotations": [], "categories": []}', 'lists no images'),
])
def test_bad_annotation_file_is_named(tiny_coco, tmp_path, content, message):
    cfg = _cfg(tiny_coco, tmp_path)
    bad = tmp_path / 'bad.json'
    bad.write_bytes(content)
    cfg.train_dataloader.dataset.ann_file = str(bad)
    with pytest.raises(PreflightError, match=message) as err:
        check_data(cfg, ['train_dataloader'])
    assert str(bad) in str(err.value) and 'train_dataloader.dataset.ann_file' in str(err.value)


def test_missing_data_root_and_class_filter(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path)
    cfg.val_dataloader.dataset.data_root = str(tmp_path / 'coco') + '/'
    with pytest.raises(PreflightError, match=r'data root .*coco/.* does not exist'):
        check_data(cfg, ['train_dataloader', 'val_dataloader'])
    cfg = _cfg(tiny_coco, tmp_path)
    cfg.train_dataloader.dataset.metainfo = dict(classes=('zebra', 'giraffe'))
    with pytest.raises(PreflightError, match='empty after class filtering'):
        check_data(cfg, ['train_dataloader'])
    names = [c['name'] for c in json.load(open(
        os.path.join(tiny_coco, 'annotations', 'instances_train.json')))['categories']]
    cfg.train_dataloader.dataset.metainfo = dict(classes=tuple(names[:1]))
    check_data(cfg, ['train_dataloader'])


def test_pattern_leaving_targets_dense_is_refused(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, **{'model.backbone.conv_cfg': dict(type='MaxQConv2d', n=2, m=3)})
    with pytest.raises(PreflightError, match='leaves 20 of the 20 targeted layers dense') as err:
        check_compression(cfg, PreflightReport())
    assert 'backbone.conv1: the 3-channel stem is dense by rule' in str(err.value)
    assert 'not divisible by M=3' in str(err.value)
    cfg.preflight = dict(max_dense_share=1.0)
    report = PreflightReport()
    check_compression(cfg, report)
    assert '20 of 20 targeted layers stay dense' in report.notes[0]


def test_block_size_leaving_targets_dense_is_refused(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, base=SAPP)
    cfg.model.backbone.conv_cfg.block_size = 7
    with pytest.raises(PreflightError, match='targeted layers dense'):
        check_compression(cfg, PreflightReport())


def test_frozen_compressed_layers_are_reported(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, **{'model.backbone.frozen_stages': 1})
    report = PreflightReport()
    check_compression(cfg, report)
    assert len(report.warnings) == 1
    # layer1's 2 blocks × 2 convs of R18; the frozen stem is dense anyway
    assert report.warnings[0].startswith('4 compressed layers are frozen')
    assert 'backbone.layer1.0.conv1' in report.warnings[0]


def test_non_finite_checkpoint_is_named(tmp_path):
    state = {'a.weight': torch.ones(3), 'b.weight': torch.tensor([1.0, float('inf')]),
             'steps': torch.tensor([3])}
    path = tmp_path / 'ckpt.pth'
    torch.save(dict(state_dict=state), path)
    with pytest.raises(PreflightError, match=r'b\.weight holds 1 NaN/inf values'):
        check_checkpoint(str(path), 'load_from')
    state['b.weight'][1] = 0
    torch.save(dict(state_dict=state), path)
    check_checkpoint(str(path), 'load_from')
    with pytest.raises(PreflightError, match='does not exist'):
        check_checkpoint(str(tmp_path / 'missing.pth'), 'load_from')


def test_hook_arguments_are_checked(tiny_coco, tmp_path):
    cfg = _cfg(tiny_coco, tmp_path, custom_hooks=[dict(type='MaxQHook', start=5, end=2)])
    with pytest.raises(PreflightError, match=r'custom_hooks\[0\] \(MaxQHook\)'):
        check_hooks(cfg)


def _with_init(tiny_coco, tmp_path, checkpoint: str) -> Config:
    cfg = _cfg(tiny_coco, tmp_path)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=checkpoint)
    return cfg


def test_init_weights_that_cannot_be_loaded(tiny_coco, tmp_path):
    from mmsparse.engine.preflight import check_init_weights
    with pytest.raises(PreflightError, match=r"model\.backbone\.init_cfg\.checkpoint='/no/r50.pth'"
                                             ': the file does not exist'):
        check_init_weights(_with_init(tiny_coco, tmp_path, '/no/r50.pth'))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(PreflightError, match='needs torchvision, which is not installed') as err:
            check_init_weights(_with_init(tiny_coco, tmp_path, 'torchvision://resnet50'))
        assert '--cfg-options model.backbone.init_cfg.checkpoint=/path/to/weights.pth' in str(err.value)
    # an unroutable host (TEST-NET-1, RFC 5737) cannot be reached within the probe's timeout
    with pytest.raises(PreflightError, match='needs a download from 192.0.2.1'):
        check_init_weights(_with_init(tiny_coco, tmp_path, 'https://192.0.2.1/r50-0000.pth'))
    local = tmp_path / 'r50.pth'
    local.write_bytes(b'')
    check_init_weights(_with_init(tiny_coco, tmp_path, str(local)))
