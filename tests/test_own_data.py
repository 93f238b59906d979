"""docs/own_data.md: the own-data config trains on a COCO-format dataset from a local backbone
checkpoint, through tools/train.py, with nothing downloaded."""
import json
import os

import pytest
import torch
from helpers import run_tool
from mmengine.config import Config

OWN = 'configs/own-data_maxq_mask-rcnn_r50_1-16.py'
pytestmark = pytest.mark.slow


def test_own_data_config_trains_from_a_local_backbone(tiny_coco, tmp_path):
    from mmdet.models.backbones import ResNet
    backbone = ResNet(depth=50)
    for param in backbone.parameters():
        torch.nn.init.normal_(param, std=0.01)
    weights = tmp_path / 'resnet50_imagenet.pth'
    torch.save(backbone.state_dict(), weights)
    classes = [c['name'] for c in json.load(open(
        os.path.join(tiny_coco, 'annotations', 'instances_train.json')))['categories']]
    cfg = Config.fromfile(OWN)
    cfg.merge_from_dict({
        'classes': classes, 'model.backbone.init_cfg.checkpoint': str(weights),
        'model.roi_head.bbox_head.num_classes': len(classes),
        'model.roi_head.mask_head.num_classes': len(classes),
        'train_cfg': dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1, val_interval=1),
        'param_scheduler': [],
        'default_hooks.checkpoint': dict(type='CheckpointHook', interval=1, by_epoch=False),
        'custom_hooks': [dict(type='MaxQHook', start=0, end=0)]})
    for split in ('train', 'val'):
        loader = cfg[f'{split}_dataloader']
        loader.update(batch_size=1, num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=f'{tiny_coco}/', metainfo=dict(classes=classes),
                              ann_file=f'annotations/instances_{split}.json',
                              data_prefix=dict(img=f'{split}/'))
        for step in loader.dataset.pipeline:
            if step['type'] == 'Resize':
                step['scale'] = (96, 96)
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=True)
    cfg.val_dataloader.dataset.pipeline = cfg.test_dataloader.dataset.pipeline = \
        cfg.val_dataloader.dataset.pipeline
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = \
        f'{tiny_coco}/annotations/instances_val.json'
    path = str(tmp_path / 'own.py')
    cfg.dump(path)
    proc = run_tool('train.py', [path, '--work-dir', str(tmp_path / 'wd')], timeout=900)
    log = proc.stdout + proc.stderr
    assert f'load model from: {weights}' in log
    assert 'coco/bbox_mAP' in log and os.path.isfile(tmp_path / 'wd' / 'iter_1.pth')
