# CGMQ Faster R-CNN R50-FPN, 6/6-bit-equivalent BOPs budget ((6*6)/(32*32)).
_base_ = './cgmq_faster-rcnn_r50_fpn_w4a4-budget.py'

custom_hooks = [dict(_base_.custom_hooks[0], budget_relative=(6 * 6) / (32 * 32))]
