# ACDC baseline: block magnitude selection (no attention, no logits), step schedule alternating
# sparse and dense phases, 16x16 blocks, 70% (epochs): dense [0,1) -> sparse [1,3) -> dense [3,4)
# -> sparse [4,6) -> dense [6,7) -> final sparse [7,12). Same layers and sparse-training length as SA++.
_base_ = '../dense_mask-rcnn_r50_fpn_1x_coco.py'

model = dict(backbone=dict(conv_cfg=dict(type='MagnitudeBlockConv2d', block_size=16, min_blocks=100)))
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=0.7, warmup=1, sparse=2, dense=1, cycles=3,
         by_epoch=True, interval=50)
]
