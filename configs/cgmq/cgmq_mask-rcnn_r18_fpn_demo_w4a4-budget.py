# CGMQ on the demo Mask R-CNN R18-FPN (embedded dataset, CPU): quantizes the dense demo model
# (configs/demo/dense_mask-rcnn_r18_fpn_demo.py, its final checkpoint below) from 8/8 bits under a
# 4/4-bit-equivalent BOPs budget counted at 3x256x256 with 128 RoIs.
_base_ = ['../demo/dense_mask-rcnn_r18_fpn_demo.py', './_base_/cgmq_converter.py']

load_from = 'work_dirs/demo/dense/iter_800.pth'
model = dict(_delete_=True, type='ConvertedModel', model=_base_.model, rules=_base_.cgmq.rules)
max_iters = 400
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _base_.cgmq.optim_wrapper,
    _delete_=True,
    optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.05),
    clip_grad=dict(max_norm=10.0),
    # gates: no decay, and a learning rate at which a consistently pushed gate (init +-0.1) flips
    # in ~50 steps; ranges: no decay
    paramwise_cfg=dict(custom_keys={'_gate': dict(decay_mult=0.0, lr_mult=10.0),
                                    '_range': dict(decay_mult=0.0)}))
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters,
                        eta_min=1e-6)]
custom_hooks = [
    dict(type='CGMQHook', budget_relative=(4 * 4) / (32 * 32), input_shape=(3, 256, 256),
         num_rois=128, calib_batches=4, interval=25)
]
