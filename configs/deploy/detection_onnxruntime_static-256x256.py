# Detection -> ONNX Runtime, static 256x256 input (the test pipeline resizes to it, keep_ratio=False).
_base_ = ['./_base_/onnxruntime.py']
onnx_config = dict(output_names=['dets', 'labels'], input_shape=[256, 256])
