# SA++ Mask R-CNN R50-FPN, 16x16 blocks, 90% block sparsity (phases as the 70% config).
_base_ = './sapp_mask-rcnn_r50_fpn_b16-70_1x_coco.py'

custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.9, warmup=1, sparsify=2, sparse=1, dense=1,
         cycles=2, c=4.0, by_epoch=True, interval=50)
]
