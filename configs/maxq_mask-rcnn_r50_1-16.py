# MaxQ 1:16 N:M sparse ResNet-50 backbone (all convs but the 3-channel stem), Mask R-CNN FPN, COCO 1x.
# The share of N:M blocks grows along a cubic schedule over the first ~3 epochs (22k iterations at
# batch 16), then the backbone trains fully 1:16; masks fold into the weights at the end.
# Starting from an already 1:16 ImageNet backbone: set start=0, end=0 in the hook (N:M from step 0).
_base_ = './dense_mask-rcnn_r50_fpn_1x_coco.py'

nm = dict(n=1, m=16)
model = dict(backbone=dict(conv_cfg=dict(type='MaxQConv2d', **nm)))
optim_wrapper = dict(type='NMSparseOptimWrapper', decay=2e-4)
custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=22000, interval=50)]
