# CGMQ Mask R-CNN R50-FPN on COCO 1x: every conv and linear layer quantized (weights per output
# channel, input activations per tensor), starting at 8/8 bits, under a hard budget of
# (4*4)/(32*32) of the 32/32-bit BOPs of the quantized layers, counted at 3x800x1333 with 512 RoIs
# (mask head: the first 100, as StandardRoIHead.forward). Fine-tunes the dense COCO model.
_base_ = '../dense_mask-rcnn_r50_fpn_1x_coco.py'

budget_relative = (4 * 4) / (32 * 32)
quant = dict(bits_w=8, bits_a=8)
model = dict(
    _delete_=True,
    type='ConvertedModel',
    model={{_base_.model}},
    rules=[
        dict(include=r'.*', layer=dict(type='CGMQConv2d', **quant)),
        dict(include=r'.*', layer=dict(type='CGMQLinear', **quant)),
    ])
# load_from = 'work_dirs/dense_mask-rcnn_r50_fpn_1x_coco/epoch_12.pth'  # the dense model to quantize
optim_wrapper = dict(
    type='CGMQOptimWrapper',
    R=2.0,
    # gates and ranges: no weight decay (decay would pull every gate toward its switching point)
    paramwise_cfg=dict(custom_keys={'_gate': dict(decay_mult=0.0), '_range': dict(decay_mult=0.0)}))
custom_hooks = [
    dict(type='CGMQHook', budget_relative=budget_relative, input_shape=(3, 800, 1333),
         num_rois=512, calib_batches=8, interval=50)
]
