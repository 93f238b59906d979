# Copy and edit: MaxQ 1:16 Mask R-CNN R50-FPN fine-tuned on your own COCO-format dataset, starting
# from your own ImageNet backbone checkpoint (dense, or already 1:16 sparse). Walk-through:
# docs/own_data.md.
_base_ = './maxq_mask-rcnn_r50_1-16.py'

data_root = 'data/my_dataset/'               # annotations/{train,val}.json, images/{train,val}/
classes = ('cat', 'dog')                     # the category names of your annotation files
metainfo = dict(classes=classes)

model = dict(
    # a local backbone checkpoint (torchvision/mmdet ResNet-50 keys: conv1.weight, layer1.0...);
    # MaxQ's own ImageNet checkpoints convert with tools/convert_maxq_checkpoint.py
    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='checkpoints/resnet50_imagenet.pth')),
    roi_head=dict(bbox_head=dict(num_classes=len(classes)),
                  mask_head=dict(num_classes=len(classes))))

train_dataloader = dict(dataset=dict(
    data_root=data_root, metainfo=metainfo, ann_file='annotations/train.json',
    data_prefix=dict(img='images/train/')))
val_dataloader = dict(dataset=dict(
    data_root=data_root, metainfo=metainfo, ann_file='annotations/val.json',
    data_prefix=dict(img='images/val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator

# The base schedule is mmdet's 1x (12 epochs); the share of N:M blocks grows over the first 3 epochs,
# as over the first 22k of COCO's 90k iterations in the base config.
custom_hooks = [dict(type='MaxQHook', schedule='cubic', start=0, end=3, by_epoch=True, interval=50)]
