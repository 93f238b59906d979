# SequentialAttention++ on the demo: the dense R18-FPN Mask R-CNN (configs/demo) fine-tuned with 16x16
# block sparsity, 70% of the blocks of every backbone conv with >= 100 blocks (at B=16 these are
# all 3x3 convs; the stem and the 1x1 downsample convs stay dense), 400 iterations (iterations):
# dense warm-up [0,50) -> sparsify [50,150) -> sparse [150,200) -> dense [200,250)
# -> sparsify [250,350) -> final sparse [350,400).
_base_ = '../../demo/dense_mask-rcnn_r18_fpn_demo.py'

# The dense demo's final checkpoint (train configs/demo/dense_mask-rcnn_r18_fpn_demo.py first).
dense_checkpoint = 'work_dirs/demo/dense/iter_800.pth'
load_from = dense_checkpoint

block_size = 16
sparsity = 0.7
max_iters = 400
model = dict(backbone=dict(conv_cfg=dict(type='SAPPConv2d', block_size=block_size, min_blocks=100)))
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
# Fine-tuning: lower constant-then-cosine LR; the logits get no weight decay and a 10x LR so that the
# attention moves within the short demo phases.
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'block_logits': dict(decay_mult=0.0, lr_mult=10.0)}))
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters, eta_min=1e-5),
]
custom_hooks = [
    dict(type='SequentialAttentionHook', sparsity=sparsity, warmup=50, sparsify=100, sparse=50,
         dense=50, cycles=2, c=4.0, interval=25)
]
default_hooks = dict(checkpoint=dict(by_epoch=False, interval=200, max_keep_ckpts=2))
# SA++ logits receive no gradient in SPARSE phases: DDP must allow unused parameters
model_wrapper_cfg = dict(find_unused_parameters=True)
