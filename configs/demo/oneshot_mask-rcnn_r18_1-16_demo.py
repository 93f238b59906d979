# One-shot magnitude 1:16 baseline of the MaxQ demo: masks fixed from the dense demo weights.
_base_ = './maxq_mask-rcnn_r18_1-16_demo.py'

model = dict(backbone=dict(conv_cfg=dict(type='OneShotNMConv2d', n=1, m=16)))
optim_wrapper = dict(decay=0.0)
custom_hooks = [dict(type='MaxQHook', start=0, end=0, interval=25)]
