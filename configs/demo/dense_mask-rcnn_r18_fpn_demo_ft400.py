# Control for the 400-iteration fine-tuning demos (SA++/ACDC/one-shot block, CGMQ): the dense demo
# model fine-tuned 400 more iterations with the same optimizer and schedule, no compression. The
# compressed demos are compared with this, not with the 800-iteration starting checkpoint.
_base_ = './dense_mask-rcnn_r18_fpn_demo.py'

load_from = 'work_dirs/demo/dense/iter_800.pth'
max_iters = 400
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05))
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters, eta_min=1e-5),
]
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
