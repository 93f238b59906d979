# Demo CGMQ Mask R-CNN R18-FPN under a 6/6-bit-equivalent BOPs budget ((6*6)/(32*32)).
_base_ = './cgmq_mask-rcnn_r18_fpn_demo_w4a4-budget.py'

custom_hooks = [
    dict(type='CGMQHook', budget_relative=(6 * 6) / (32 * 32), input_shape=(3, 256, 256),
         num_rois=128, calib_batches=4, interval=25)
]
