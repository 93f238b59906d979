#!/usr/bin/env bash
# The main job on the embedded demo data: dense pre-training → MaxQ 1:16 fine-tuning → COCO mAP →
# fold to a plain mmdet checkpoint → verify → ONNX Runtime (export, parity, mAP).
# The training stages are skipped when their checkpoint already exists (`make clean` starts over).
# Every stage's output goes to $W/logs/<stage>.log too; at the end, or when a stage fails, a summary
# of the stages so far (result, wall time; tools/demo_summary.py) is printed, and a failure exits
# with that stage's status.
# MMSPARSE_DEMO_PY / MMSPARSE_DEMO_DIR replace the interpreter and the work dir (used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MMSPARSE_DEMO_PY:-.venv/bin/python}
W=${MMSPARSE_DEMO_DIR:-work_dirs/demo}
export PYTHONUNBUFFERED=1  # stage output reaches the terminal and the log as it is written
# Same numbers on every machine of this kind: torch, oneDNN and MKL choose kernels by instruction set
# and the training trajectory (so the mAP) depends on it and on the thread count (measured:
# docs/benchmarks.md, "Reproducibility of the demo"). Pinned to AVX2 and 2 threads, the README's
# setting; set any of these variables to override.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2} \
  MKL_CBWR=${MKL_CBWR:-AVX2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
printf 'numerics: ATEN_CPU_CAPABILITY=%s ONEDNN_MAX_CPU_ISA=%s MKL_CBWR=%s OMP_NUM_THREADS=%s\n' \
  "$ATEN_CPU_CAPABILITY" "$ONEDNN_MAX_CPU_ISA" "$MKL_CBWR" "$OMP_NUM_THREADS"

mkdir -p "$W/logs"
: >"$W/stages.tsv"

summary() { printf '\n'; "$PY" tools/demo_summary.py "$W" || true; }

# stage KEY TITLE OUTPUT COMMAND...: run COMMAND unless OUTPUT exists ('-': always run), tee its
# output to $W/logs/KEY.log and record status and seconds in $W/stages.tsv.
stage() {
  local key=$1 title=$2 output=$3 start=$SECONDS rc=0
  shift 3
  printf '\n=== %s ===\n' "$title"
  if [[ $output != - && -f $output ]]; then
    printf 'skipped: %s exists\n' "$output"
    printf '%s\tskipped\t0\t%s\n' "$key" "$title" >>"$W/stages.tsv"
    return 0
  fi
  "$@" 2>&1 | tee "$W/logs/$key.log" || rc=$?
  if ((rc != 0)); then
    printf '%s\tfailed:%d\t%d\t%s\n' "$key" "$rc" $((SECONDS - start)) "$title" >>"$W/stages.tsv"
    summary
    exit "$rc"
  fi
  printf '%s\tok\t%d\t%s\n' "$key" $((SECONDS - start)) "$title" >>"$W/stages.tsv"
}

stage dense "1/5 dense Mask R-CNN R18-FPN from scratch (800 iterations)" "$W/dense/iter_800.pth" \
  "$PY" tools/train.py configs/demo/dense_mask-rcnn_r18_fpn_demo.py --work-dir "$W/dense"

stage maxq "2/5 MaxQ 1:16 fine-tuning from the dense checkpoint (150 iterations)" \
  "$W/maxq/iter_150.pth" \
  "$PY" tools/train.py configs/demo/maxq_mask-rcnn_r18_1-16_demo.py --work-dir "$W/maxq" \
  --cfg-options load_from="$W/dense/iter_800.pth"

stage fold "3/5 fold into a plain mmdet checkpoint (refuses any N:M violation)" - \
  "$PY" tools/fold.py configs/demo/maxq_mask-rcnn_r18_1-16_demo.py "$W/maxq/iter_150.pth" \
  --out-dir "$W/folded" --name maxq_1-16 --compressed

stage verify "4/5 verify the folded checkpoint against its recorded patterns" - \
  "$PY" tools/fold.py --verify "$W/folded/maxq_1-16.pth"

stage onnx "5/5 ONNX Runtime through mmdeploy: export, parity, COCO mAP (ORT vs exported graph)" - \
  "$PY" tools/deploy.py "$W/folded/maxq_1-16.py" "$W/folded/maxq_1-16.pth" --work-dir "$W/onnx" \
  --compare --eval --max-map-diff 1.0   # 60 images: flipped near-ties move the mAP ~0.4 (docs/deployment.md §3)

summary
