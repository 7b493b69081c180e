#!/usr/bin/env bash
# The one-command GPU check: build nanolm in place for the local GPU, run the GPU-marked tests
# and `python -m bench --quick`, and write logs, results.json/md, plots and env.txt to OUT_DIR.
# For a GPU machine with no internet and no package installs. Every step runs even after a
# failure; the exit status is non-zero if any failed. Usage: bench/gpu_check.sh OUT_DIR
set -uo pipefail
if [ $# -ne 1 ]; then echo "usage: $0 OUT_DIR" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export NANOLM_CUDA_ARCHS=${NANOLM_CUDA_ARCHS:-90a}  # only the local Hopper GPU: a fast build
FAILED=()

step() {  # step NAME CMD...: run, log to OUT/NAME.log, remember failure
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/steps.log"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
    [ $rc -eq 0 ] || FAILED+=("$name")
    return $rc
}

build() {
    # The editable install maps kernels/ to nanolm.kernels (pyproject package-dir); a bare
    # PYTHONPATH checkout cannot, so the fallback links nanolm/kernels -> kernels for the run.
    if $PY -m pip install --no-build-isolation --no-deps -e . ; then return 0; fi
    echo "editable install failed; falling back to build_ext --inplace + PYTHONPATH"
    $PY setup.py build_ext --inplace || return 1
    ln -sfn ../kernels nanolm/kernels  # so `nanolm.kernels` imports from the checkout
    echo "fallback" > "$OUT/.fallback"
}

env_file() {
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "git_commit: $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '-dirty')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
        $PY -c "import torch, triton; print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('triton:', triton.__version__)"
        echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
}

step env env_file
step nvidia-smi nvidia-smi
step build build
[ -f "$OUT/.fallback" ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step info $PY -m nanolm.info
gpu_tests() {  # pytest exits 5 when no test is marked gpu yet: not a failure
    $PY -m pytest -m gpu -q tests; local rc=$?; [ $rc -eq 5 ] && return 0; return $rc
}
step pytest-gpu gpu_tests
step bench $PY -m bench --quick --out "$OUT"
[ -f "$OUT/.fallback" ] && rm -f nanolm/kernels "$OUT/.fallback"

if [ ${#FAILED[@]} -ne 0 ]; then echo "FAILED steps: ${FAILED[*]} (logs in $OUT)"; exit 1; fi
echo "all steps passed; results in $OUT"
