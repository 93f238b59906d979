"""Helpers of the export tests: a tiny N:M-sparse Mask R-CNN (R18 demo, MaxQ 1:16 backbone, converted
neck and box head)."""
import os.path as osp
import sys

import torch
from mmengine.config import Config

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CFG = osp.join(REPO, 'configs', 'demo', 'dense_mask-rcnn_r18_fpn_demo.py')
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))


def sparse_demo_config(data_root: str) -> Config:
    """The demo Mask R-CNN with MaxQ 1:16 backbone convs (conv_cfg), SR-STE 2:4 FPN convs and MaxQ
    2:8 box-head fcs (both through ``ConvertedModel``), MaxQ hook and optim wrapper, on ``data_root``."""
    cfg = Config.fromfile(DEMO_CFG)
    cfg.model.backbone.conv_cfg = dict(type='MaxQConv2d', n=1, m=16)
    cfg.model = dict(
        type='ConvertedModel', model=cfg.model,
        rules=[dict(include=r'neck\.fpn_convs\.\d\.conv', layer=dict(type='SRSTEConv2d', n=2, m=4)),
               dict(include=r'roi_head\.bbox_head\.shared_fcs\.\d',
                    layer=dict(type='MaxQLinear', n=2, m=8))])
    cfg.optim_wrapper = dict(type='NMSparseOptimWrapper', decay=2e-4,
                             optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                             clip_grad=dict(max_norm=10.0))
    cfg.custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=10, interval=5)]
    cfg.load_from = 'some/pretrained.pth'
    data_root = data_root.rstrip('/') + '/'
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[split].dataset.data_root = data_root
        cfg[split].num_workers = 0
        cfg[split].persistent_workers = False
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = data_root + 'annotations/instances_val.json'
    cfg.work_dir = osp.join(data_root, 'work_dir')
    return cfg


def make_trained_sparse(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for training: mmdet's initialisation, random batch-norm statistics, objectness and
    class logits scaled up so scores spread out (no near-ties), then every N:M layer's final mask
    (preserve rate 0)."""
    from mmsparse.maxq import NMSparseMixin
    torch.manual_seed(seed)
    model.init_weights()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        for name in ('rpn_head.rpn_cls', 'roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg',
                     'rpn_head.rpn_reg'):
            layer = model.get_submodule(name)
            layer.weight.mul_(SCALE[name])
            layer.bias.normal_(0, 0.5 if 'cls' in name else 0.05)
        for m in model.modules():
            if isinstance(m, NMSparseMixin):
                m.refresh_mask(0.0)


SCALE = {'rpn_head.rpn_cls': 30.0, 'roi_head.bbox_head.fc_cls': 30.0,
         'roi_head.bbox_head.fc_reg': 10.0, 'rpn_head.rpn_reg': 10.0}


def sparse_detector_config(kind: str, data_root: str) -> Config:
    """Tiny R18 Faster R-CNN or RetinaNet with a MaxQ 1:16 backbone, on the demo data."""
    cfg = Config.fromfile(DEMO_CFG)
    import mmdet
    base = {'faster-rcnn': 'faster-rcnn_r50_fpn.py', 'retinanet': 'retinanet_r50_fpn.py'}[kind]
    model = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', '_base_',
                                     'models', base)).model
    model.backbone.update(depth=18, init_cfg=None, conv_cfg=dict(type='MaxQConv2d', n=1, m=16))
    model.neck.update(in_channels=[64, 128, 256, 512], out_channels=64)
    if kind == 'faster-rcnn':
        model.rpn_head.update(in_channels=64, feat_channels=64)
        model.roi_head.bbox_roi_extractor.out_channels = 64
        model.roi_head.bbox_head.update(in_channels=64, fc_out_channels=256, num_classes=5)
    else:
        model.bbox_head.update(in_channels=64, feat_channels=64, num_classes=5)
    cfg.model = model
    cfg.val_evaluator.metric = cfg.test_evaluator.metric = ['bbox']
    data_root = data_root.rstrip('/') + '/'
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[split].dataset.data_root = data_root
        cfg[split].num_workers = 0
        cfg[split].persistent_workers = False
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = data_root + 'annotations/instances_val.json'
    return cfg
