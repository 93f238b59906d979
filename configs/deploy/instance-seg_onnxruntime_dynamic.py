# Instance segmentation (Mask R-CNN) -> ONNX Runtime, dynamic batch and image size.
# Masks leave the graph as per-RoI mask logits-probabilities (28x28); mmdeploy pastes them into the
# image on the Python side (export_postprocess_mask=False), as mmdet does.
_base_ = ['./_base_/onnxruntime.py']
onnx_config = dict(
    output_names=['dets', 'labels', 'masks'],
    dynamic_axes=dict(
        input=dict({0: 'batch', 2: 'height', 3: 'width'}),
        dets=dict({0: 'batch', 1: 'num_dets'}),
        labels=dict({0: 'batch', 1: 'num_dets'}),
        masks=dict({0: 'batch', 1: 'num_dets', 2: 'height', 3: 'width'})))
codebase_config = dict(post_processing=dict(export_postprocess_mask=False))
