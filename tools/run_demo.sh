#!/usr/bin/env bash
# The main job on the embedded demo data: dense pre-training → MaxQ 1:16 fine-tuning → COCO mAP →
# fold to a plain mmdet checkpoint → verify → ONNX Runtime (export, parity, mAP).
# Each stage is skipped when its output already exists (delete work_dirs/demo to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=work_dirs/demo

stage() { printf '\n=== %s ===\n' "$*"; }

stage "1/5 dense Mask R-CNN R18-FPN from scratch (800 iterations)"
[[ -f $W/dense/iter_800.pth ]] || $PY tools/train.py configs/demo/dense_mask-rcnn_r18_fpn_demo.py \
  --work-dir $W/dense

stage "2/5 MaxQ 1:16 fine-tuning from the dense checkpoint (150 iterations)"
[[ -f $W/maxq/iter_150.pth ]] || $PY tools/train.py configs/demo/maxq_mask-rcnn_r18_1-16_demo.py \
  --work-dir $W/maxq

stage "3/5 fold into a plain mmdet checkpoint (refuses any N:M violation)"
$PY tools/fold.py configs/demo/maxq_mask-rcnn_r18_1-16_demo.py $W/maxq/iter_150.pth \
  --out-dir $W/folded --name maxq_1-16 --compressed

stage "4/5 verify the folded checkpoint against its recorded patterns"
$PY tools/fold.py --verify $W/folded/maxq_1-16.pth

stage "5/5 ONNX Runtime through mmdeploy: export, parity with PyTorch, COCO mAP"
$PY tools/deploy.py $W/folded/maxq_1-16.py $W/folded/maxq_1-16.pth --work-dir $W/onnx \
  --compare --eval

printf '\nmAP of each stage: grep coco/bbox_mAP %s/*/*/*.log\n' "$W"
