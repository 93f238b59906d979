# SA++ Faster R-CNN R50-FPN, 32x32 blocks, 70% block sparsity.
_base_ = './sapp_faster-rcnn_r50_fpn_b16-70_1x_coco.py'

model = dict(backbone=dict(conv_cfg=dict(type='SAPPConv2d', block_size=32, min_blocks=100)))
