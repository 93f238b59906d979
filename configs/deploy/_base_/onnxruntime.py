# mmdeploy (1.3.1) base pieces for the onnxruntime backend; the mmdeploy wheel ships no configs.
backend_config = dict(type='onnxruntime')
onnx_config = dict(
    type='onnx',
    export_params=True,
    keep_initializers_as_inputs=False,
    opset_version=11,  # mmdeploy's default; per-channel QDQ (CGMQ) needs 13+
    save_file='end2end.onnx',
    input_names=['input'],
    output_names=['dets', 'labels'],
    input_shape=None,
    optimize=True)
# mmdeploy's post-processing settings for exported end-to-end detectors. Two-stage and RetinaNet
# heads take score threshold, NMS IoU and max detections from the model's own test_cfg; these are
# the fallbacks (and RPN's pre_top_k). mmsparse's deploy tool fills them from the model test_cfg.
codebase_config = dict(
    type='mmdet',
    task='ObjectDetection',
    model_type='end2end',
    post_processing=dict(
        score_threshold=0.05,
        confidence_threshold=0.005,
        iou_threshold=0.5,
        max_output_boxes_per_class=200,
        pre_top_k=5000,
        keep_top_k=100,
        background_label_id=-1))
