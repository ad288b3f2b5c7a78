#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with the reference deepmd-kit 3.2.0
# (PyTorch backend only) built against torch 2.13.0 (CPU).
#
#   bash bench/deepmd_ref/setup_venv.sh            # -> prints the venv's python path
#   DEEPMD_VENV=/some/dir bash bench/deepmd_ref/setup_venv.sh
#   DEEPMD_MODE=wheel DEEPMD_VENV=/tmp/dpw bash bench/deepmd_ref/setup_venv.sh
#
# Modes (DEEPMD_MODE):
#   src   (default) build deepmd-kit from the PyPI sdist with its C++ custom ops
#         (libdeepmd_op_pt.so) compiled against the local torch; everything works,
#         incl. `dp --pt compress`.  ~2-3 min on 2 cores.
#   wheel install the prebuilt manylinux wheel (ops built for torch 2.11, which do
#         not load with torch 2.13), move libdeepmd_op_pt.so aside so deepmd falls
#         back to pure-python ops.  train / freeze / test / DeepPot work, compress not.
# Env knobs: DEEPMD_VENV, DEEPMD_MODE, PYTHON (interpreter used to create the venv),
#            TORCH_SPEC (default torch==2.13.0), FORCE=1 (re-install even if OK).
# Prints the venv's python path as the LAST line of stdout; exits non-zero on failure.
set -euo pipefail

VENV="${DEEPMD_VENV:-$HOME/.cache/lamflow/deepmd-venv}"
MODE="${DEEPMD_MODE:-src}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
DP_SPEC="deepmd-kit==3.2.0"
log() { echo "[setup_venv] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "$MODE" in src|wheel) ;; *) die "DEEPMD_MODE must be src or wheel (got $MODE)";; esac

# never inside the repository (it would be picked up by git / pytest / packaging)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
mkdir -p "$(dirname "$VENV")"
VENV_ABS="$(cd "$(dirname "$VENV")" && pwd)/$(basename "$VENV")"
case "$VENV_ABS/" in "$REPO"/*) die "venv path $VENV_ABS is inside the repo $REPO";; esac
VENV="$VENV_ABS"
VPY="$VENV/bin/python"

# check: prints nothing, exit 0 when the venv is complete for the requested mode
check_venv() {
  [ -x "$VPY" ] && [ -x "$VENV/bin/dp" ] || return 1
  DP_CHECK_MODE="$MODE" "$VPY" - <<'PY' >&2
import os, sys
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
import deepmd
assert deepmd.__version__.startswith("3.2.0"), deepmd.__version__
import deepmd.pt  # noqa: F401  (loads libdeepmd_op_pt.so when present)
from deepmd.pt.cxx_op import ENABLE_CUSTOMIZED_OP
want = os.environ["DP_CHECK_MODE"] == "src"
print(f"[setup_venv] torch {torch.__version__}, deepmd {deepmd.__version__}, "
      f"custom ops enabled: {ENABLE_CUSTOMIZED_OP}", file=sys.stderr)
if want:
    assert ENABLE_CUSTOMIZED_OP, "custom ops not loaded"
    assert hasattr(torch.ops.deepmd, "tabulate_fusion_se_a"), "torch.ops.deepmd.tabulate_fusion_se_a missing"
PY
}

if [ "${FORCE:-0}" != 1 ] && check_venv 2>/dev/null; then
  log "venv $VENV already complete (mode=$MODE); nothing to do"
  "$VENV/bin/dp" --version >&2 || true
  echo "$VPY"
  exit 0
fi

T0=$(date +%s)
if [ ! -x "$VPY" ]; then
  log "creating venv $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VPY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

# 1. torch first (the local CPU wheel from /opt/wheels via pip.conf find-links), then pin it
log "installing $TORCH_SPEC"
"${PIP[@]}" install -q "$TORCH_SPEC" numpy
TORCH_VER="$("$VPY" -c 'import torch; print(torch.__version__)')"
CONS="$VENV/constraints.txt"
echo "torch==${TORCH_VER%%+*}" > "$CONS"
log "torch $TORCH_VER installed; pinned in $CONS"

T1=$(date +%s)
if [ "$MODE" = src ]; then
  # 2. build deps (no build isolation: isolation would pull torch 2.11 + tensorflow-cpu);
  #    system cmake 3.25.1 is too old -> cmake from PyPI
  log "installing build dependencies"
  "${PIP[@]}" install -q -c "$CONS" scikit-build-core packaging dependency_groups setuptools_scm \
      hatch-fancy-pypi-readme "cmake>=3.25.2" ninja mpich
  export PATH="$VENV/bin:$PATH"   # so the PyPI cmake/ninja win over /usr/bin
  log "building $DP_SPEC from sdist (PyTorch ops only); takes ~2-3 min"
  DP_ENABLE_TENSORFLOW=0 DP_ENABLE_PYTORCH=1 DP_VARIANT=cpu CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install --no-build-isolation --no-binary deepmd-kit -c "$CONS" "$DP_SPEC" e3nn
else
  log "installing prebuilt $DP_SPEC wheel (+ mpich, e3nn)"
  "${PIP[@]}" install -q -c "$CONS" --only-binary deepmd-kit "$DP_SPEC" mpich e3nn
  SO="$("$VPY" -c 'import importlib.util, os; s = importlib.util.find_spec("deepmd"); print(os.path.join(os.path.dirname(s.origin), "lib", "libdeepmd_op_pt.so"))')"
  if [ -f "$SO" ]; then
    mv "$SO" "$SO.disabled-torch-mismatch"
    log "moved $SO aside (built for another torch; pure-python fallback is used)"
  fi
fi
T2=$(date +%s)
log "deepmd install took $((T2 - T1)) s; total $((T2 - T0)) s"

check_venv || die "venv check failed"
"$VENV/bin/dp" --version >&2
echo "$VPY"
