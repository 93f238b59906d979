# SequentialAttention++ block sparsity on the ResNet-50 backbone of Faster R-CNN R50-FPN, COCO 1x.
# 16x16 blocks, 70% of the blocks pruned; phases as the Mask R-CNN configs (epochs):
# dense [0,1) -> sparsify [1,3) -> sparse [3,4) -> dense [4,5) -> sparsify [5,7) -> final sparse [7,12).
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    '../_base_/default_runtime.py',
]

model = dict(backbone=dict(conv_cfg=dict(type='SAPPConv2d', block_size=16, min_blocks=100)))
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'block_logits': dict(decay_mult=0.0)}))
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparsify=2, sparse=1, dense=1,
         cycles=2, c=4.0, by_epoch=True, interval=50)
]
# SA++ logits receive no gradient in SPARSE phases: DDP must allow unused parameters
find_unused_parameters = True
