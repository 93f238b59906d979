# MaxQ 1:8 variant of configs/maxq_mask-rcnn_r50_1-16.py.
_base_ = '../maxq_mask-rcnn_r50_1-16.py'

model = dict(backbone=dict(conv_cfg=dict(type='MaxQConv2d', n=1, m=8)))
