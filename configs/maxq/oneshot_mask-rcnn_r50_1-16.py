# One-shot magnitude 1:16 (ASP): mask fixed from the pretrained weights, gradients and weights masked.
_base_ = '../maxq_mask-rcnn_r50_1-16.py'

model = dict(backbone=dict(conv_cfg=dict(type='OneShotNMConv2d', n=1, m=16)))
optim_wrapper = dict(decay=0.0)
custom_hooks = [dict(type='MaxQHook', start=0, end=0, interval=50)]
