# ACDC baseline for Faster R-CNN R50-FPN, 16x16 blocks, 70%; phases as the Mask R-CNN ACDC config.
_base_ = './sapp_faster-rcnn_r50_fpn_b16-70_1x_coco.py'

model = dict(backbone=dict(conv_cfg=dict(type='MagnitudeBlockConv2d', block_size=16, min_blocks=100)))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparse=2, dense=1, cycles=3,
         by_epoch=True, interval=50)
]
