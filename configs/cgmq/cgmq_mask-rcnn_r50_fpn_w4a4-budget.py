# CGMQ Mask R-CNN R50-FPN on COCO 1x: every conv and linear layer quantized (weights per output
# channel, input activations per tensor), starting at 8/8 bits, under a hard budget of
# (4*4)/(32*32) of the 32/32-bit BOPs of the quantized layers, counted at 3x800x1333 with 512 RoIs
# (mask head: the first 100, as StandardRoIHead.forward). Fine-tunes the dense COCO model.
_base_ = ['../dense_mask-rcnn_r50_fpn_1x_coco.py', './_base_/cgmq_converter.py']

model = dict(_delete_=True, type='ConvertedModel', model=_base_.model, rules=_base_.cgmq.rules)
# load_from = 'work_dirs/dense_mask-rcnn_r50_fpn_1x_coco/epoch_12.pth'  # the dense model to quantize
optim_wrapper = _base_.cgmq.optim_wrapper
custom_hooks = [
    dict(type='CGMQHook', budget_relative=(4 * 4) / (32 * 32), input_shape=(3, 800, 1333),
         num_rois=512, calib_batches=8, interval=50)
]
