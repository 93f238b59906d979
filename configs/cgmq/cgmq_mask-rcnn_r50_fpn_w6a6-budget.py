# CGMQ Mask R-CNN R50-FPN under a 6/6-bit-equivalent budget: (6*6)/(32*32) of the 32/32 BOPs.
_base_ = './cgmq_mask-rcnn_r50_fpn_w4a4-budget.py'

custom_hooks = [dict(_base_.custom_hooks[0], budget_relative=(6 * 6) / (32 * 32))]
