# One-shot block magnitude pruning: 70% of the 16x16 blocks with the smallest Frobenius norm pruned
# from the ImageNet weights before the first step, then sparse fine-tuning for the whole 1x schedule.
_base_ = '../dense_mask-rcnn_r50_fpn_1x_coco.py'

model = dict(backbone=dict(conv_cfg=dict(type='MagnitudeBlockConv2d', block_size=16, min_blocks=100)))
custom_hooks = [dict(type='SequentialAttentionHook', sparsity=0.7, interval=50)]
