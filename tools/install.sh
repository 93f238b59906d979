#!/usr/bin/env bash
# Create or update .venv/ with the pinned OpenMMLab stack and mmsparse (editable).
#
# Idempotent: a stamp records the hash of the pins and packaging files, so a second run with nothing
# changed only re-checks the imports (seconds). Any failing step stops the script with its exit code.
#
# Environment switches:
#   PYTHON=python3.11            interpreter that creates the venv (default: python3)
#   TORCH_INDEX_URL=<url>        take torch from that index, e.g. a CUDA build
#                                (https://download.pytorch.org/whl/cu121); mmcv then compiles its
#                                CUDA ops as well when nvcc is found (set FORCE_CUDA=1 to insist).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
pins="$root/requirements/pins.txt"
py="$venv/bin/python"
stamp="$venv/.mmsparse-install-stamp"

log() { printf '[install] %s\n' "$*"; }
pin() { grep -E "^$1([=<>]|$)" "$pins" | head -n 1; }

want="$(cat "$pins" "$root/tools/install.sh" "$root/pyproject.toml" "$root/setup.cfg" \
          "$root/setup.py" "$root"/mmsparse/csrc/* | sha256sum | cut -d' ' -f1)${TORCH_INDEX_URL:+-$TORCH_INDEX_URL}"

check() {
  "$py" - <<'PY'
import mmcv, mmdet, mmengine, torch
from mmcv.ops import RoIAlign, nms  # noqa: F401  compiled ops must be present
import mmsparse, mmsparse._ext  # noqa: F401  mmsparse's CPU kernels must be built
print(f'[install] ok: torch {torch.__version__}, mmcv {mmcv.__version__}, '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, mmsparse {mmsparse.__version__}')
PY
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && check; then
  exit 0
fi

start=$SECONDS
if [[ ! -x "$py" ]]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip_install() { "$py" -m pip install --disable-pip-version-check -c "$pins" "$@"; }

log "stage 1/4: torch and build prerequisites"
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  # torchvision from the same index, the build matching the pinned torch (pip resolves the pair),
  # so torchvision:// ImageNet weights load
  "$py" -m pip install --disable-pip-version-check --index-url "$TORCH_INDEX_URL" "$(pin torch)" torchvision
else
  "$py" -m pip install --disable-pip-version-check "$(pin torch)"
  log "torchvision is not installed: the registry's build is for CUDA and cannot load beside this" \
      "CPU torch, so init_cfg='torchvision://...' weights need a local checkpoint instead (README)"
fi
pip_install "$(pin setuptools)" "$(pin wheel)" "$(pin numpy)"

log "stage 2/4: mmcv with compiled ops (first build 10-35 min on 2 cores; cached afterwards)"
if ! "$py" -c "import mmcv, sys; from mmcv.ops import nms; sys.exit(mmcv.__version__ != '$(pin mmcv | cut -d= -f3)')" 2>/dev/null; then
  mmcv_start=$SECONDS
  # heartbeat: pip says nothing but "still running..." while mmcv compiles
  ( while sleep 60; do log "mmcv: compiling its ops, $(( (SECONDS - mmcv_start) / 60 )) min elapsed"; done ) &
  heartbeat=$!
  trap 'kill "$heartbeat" 2>/dev/null' EXIT
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" pip_install --no-build-isolation "$(pin mmcv)"
  kill "$heartbeat" 2>/dev/null
  trap - EXIT
  log "mmcv built in $(( (SECONDS - mmcv_start) / 60 )) min"
fi

log "stage 3/4: mmengine, mmdet, pycocotools, onnx, onnxruntime, mmdeploy, test tools"
mapfile -t rest < <(sed -n '/^# Stage 3/,$p' "$pins" | grep -vE '^\s*(#|$)')
pip_install "${rest[@]}" "$(pin numpy)" "$(pin opencv-python)"

log "stage 4/4: mmsparse (editable) and its CPU kernels (mmsparse/csrc, ~1 min)"
pip_install --no-build-isolation --no-deps -e "$root"

check
echo "$want" > "$stamp"
log "done in $((SECONDS - start)) s"
