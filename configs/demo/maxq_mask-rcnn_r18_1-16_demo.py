# Demo of configs/maxq_mask-rcnn_r50_1-16.py on the embedded dataset (CPU): fine-tune the dense demo
# checkpoint with a MaxQ 1:16 backbone (all convs but the 3-channel stem). The share of N:M blocks
# grows along a cubic schedule over the first half of training; masks fold at the end.
_base_ = './dense_mask-rcnn_r18_fpn_demo.py'

load_from = 'work_dirs/demo/dense/iter_800.pth'
model = dict(backbone=dict(conv_cfg=dict(type='MaxQConv2d', n=1, m=16)))

max_iters = 150
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(type='NMSparseOptimWrapper', decay=2e-4, optimizer=dict(lr=3e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-5),
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=max_iters // 2, interval=25)]
