# MaxQ 2:4 on backbone, neck and heads through the model-level converter (no conv_cfg edits):
# every Conv2d/Linear of backbone, neck, RPN and RoI heads except the stem and the final predictors.
_base_ = '../dense_mask-rcnn_r50_fpn_1x_coco.py'

model = dict(
    _delete_=True,
    type='ConvertedModel',
    model={{_base_.model}},
    rules=[
        dict(include=[r'backbone\..*', r'neck\..*', r'rpn_head\.rpn_conv', r'roi_head\..*'],
             exclude=[r'backbone\.conv1', r'roi_head\.bbox_head\.fc_(cls|reg)',
                      r'roi_head\.mask_head\.conv_logits'],
             layer=dict(type='MaxQConv2d', n=2, m=4)),
        dict(include=r'roi_head\.bbox_head\.shared_fcs\..*', layer=dict(type='MaxQLinear', n=2, m=4)),
    ])
optim_wrapper = dict(type='NMSparseOptimWrapper', decay=2e-4)
custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=22000, interval=50)]
