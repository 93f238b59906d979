# Dense baseline: mmdet's Mask R-CNN R50-FPN 1x on COCO 2017, ImageNet-pretrained backbone (init_cfg).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    './_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    './_base_/default_runtime.py',
]
