# ACDC baseline on the demo: block magnitude selection, step schedule, same layers, target, LR and
# length as the SA++ demo (iterations): dense [0,50) -> sparse [50,150) -> dense [150,250)
# -> final sparse [250,400).
_base_ = './sapp_mask-rcnn_r18_fpn_b16-70_demo.py'

model = dict(backbone=dict(conv_cfg=dict(type='MagnitudeBlockConv2d', block_size=16, min_blocks=100)))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.7, warmup=50, sparse=100, dense=100, cycles=2,
         interval=25)
]
