# SR-STE baseline of the MaxQ demo: hard 1:16 masks from the first step, same decay and schedule.
_base_ = './maxq_mask-rcnn_r18_1-16_demo.py'

model = dict(backbone=dict(conv_cfg=dict(type='SRSTEConv2d', n=1, m=16)))
custom_hooks = [dict(type='MaxQHook', start=0, end=0, interval=25)]
