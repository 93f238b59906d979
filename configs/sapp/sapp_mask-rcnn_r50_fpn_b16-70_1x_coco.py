# SequentialAttention++ block sparsity on the ResNet-50 backbone of Mask R-CNN R50-FPN, COCO 1x.
# 16x16 blocks of each conv's implicit-GEMM view, 70% of the blocks pruned in every layer that has at
# least 100 blocks (the 7x7 stem and the small 1x1 convs stay dense and are reported).
# Phases (epochs): dense warm-up [0,1) -> sparsify [1,3) -> sparse [3,4) -> dense [4,5)
#                  -> sparsify [5,7) -> final sparse [7,12).
_base_ = '../dense_mask-rcnn_r50_fpn_1x_coco.py'

block_size = 16
sparsity = 0.7
model = dict(backbone=dict(conv_cfg=dict(type='SAPPConv2d', block_size=block_size, min_blocks=100)))
# Block logits: no weight decay (it would pull the attention back to uniform).
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'block_logits': dict(decay_mult=0.0)}))
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=sparsity, warmup=1, sparsify=2, sparse=1, dense=1,
         cycles=2, c=4.0, by_epoch=True, interval=50)
]
# SA++ logits receive no gradient in SPARSE phases: DDP must allow unused parameters
find_unused_parameters = True
