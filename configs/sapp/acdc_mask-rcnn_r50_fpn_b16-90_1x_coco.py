# ACDC baseline, 16x16 blocks, 90% block sparsity (phases as the 70% config).
_base_ = './acdc_mask-rcnn_r50_fpn_b16-70_1x_coco.py'

custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.9, warmup=1, sparse=2, dense=1, cycles=3,
         by_epoch=True, interval=50)
]
