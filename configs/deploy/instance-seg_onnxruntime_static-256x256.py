# Instance segmentation -> ONNX Runtime, static 256x256 input.
_base_ = ['./_base_/onnxruntime.py']
onnx_config = dict(output_names=['dets', 'labels', 'masks'], input_shape=[256, 256])
codebase_config = dict(post_processing=dict(export_postprocess_mask=False))
