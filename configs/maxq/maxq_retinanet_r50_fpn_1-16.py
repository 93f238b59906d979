# MaxQ 1:16 backbone for RetinaNet R50-FPN, COCO 1x.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    '../_base_/default_runtime.py',
]

optim_wrapper = dict(type='NMSparseOptimWrapper', decay=2e-4,
                     optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001))
model = dict(backbone=dict(conv_cfg=dict(type='MaxQConv2d', n=1, m=16)))
custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=22000, interval=50)]
