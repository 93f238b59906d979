# Demo CGMQ Mask R-CNN R18-FPN under a 6/6-bit-equivalent BOPs budget ((6*6)/(32*32)).
_base_ = './cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'

custom_hooks = [dict(_base_.custom_hooks[0], budget_relative=(6 * 6) / (32 * 32))]
