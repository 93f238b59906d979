# SR-STE baseline: hard 1:16 mask recomputed every step, straight-through gradient, same decay.
_base_ = '../maxq_mask-rcnn_r50_1-16.py'

model = dict(backbone=dict(conv_cfg=dict(type='SRSTEConv2d', n=1, m=16)))
custom_hooks = [dict(type='MaxQHook', start=0, end=0, interval=50)]
