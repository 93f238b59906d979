# Detection (Faster R-CNN, RetinaNet, ...) -> ONNX Runtime, dynamic batch and image size.
_base_ = ['./_base_/onnxruntime.py']
onnx_config = dict(
    output_names=['dets', 'labels'],
    dynamic_axes=dict(
        input=dict({0: 'batch', 2: 'height', 3: 'width'}),
        dets=dict({0: 'batch', 1: 'num_dets'}),
        labels=dict({0: 'batch', 1: 'num_dets'})))
