# One-shot block magnitude pruning on the demo: 70% of the 16x16 blocks pruned from the dense demo
# checkpoint before the first step, then 400 sparse fine-tuning iterations (LR as the SA++ demo).
_base_ = './sapp_mask-rcnn_r18_fpn_b16-70_demo.py'

model = dict(backbone=dict(conv_cfg=dict(type='MagnitudeBlockConv2d', block_size=16, min_blocks=100)))
optim_wrapper = dict(paramwise_cfg=dict(_delete_=True))
custom_hooks = [dict(type='SequentialAttentionHook', sparsity=0.7, interval=25)]
