# CGMQ Faster R-CNN R50-FPN on COCO 1x, 4/4-bit-equivalent BOPs budget ((4*4)/(32*32)), counted at
# 3x800x1333 with 512 RoIs; all conv and linear layers quantized, starting at 8/8 bits.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    '../_base_/default_runtime.py',
    './_base_/cgmq_converter.py',
]

model = dict(_delete_=True, type='ConvertedModel', model=_base_.model, rules=_base_.cgmq.rules)
optim_wrapper = _base_.cgmq.optim_wrapper
custom_hooks = [
    dict(type='CGMQHook', budget_relative=(4 * 4) / (32 * 32), input_shape=(3, 800, 1333),
         num_rois=512, calib_batches=8, interval=50)
]
