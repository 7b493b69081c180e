#!/usr/bin/env bash
# The GPU check: build nanolm in place for the local GPU, run the GPU-marked tests and
# compute-sanitizer over the CUDA kernels (mode `tests`), `python -m bench --quick` (mode
# `bench`), or all of it (mode `all`, the default), writing logs, results.json/md, plots and
# env.txt to OUT_DIR. For a GPU machine with no internet and no package installs. Every step
# runs even after a failure; the exit status is non-zero if any failed. The whole check stays
# inside a time budget (NANOLM_CHECK_BUDGET_S, default 540 s): each step gets at most its cap
# and what is left, and is killed past it (the bench keeps what it measured: it writes results
# after every op). Where one command may run 10 minutes at most, run `tests` and `bench` as two
# commands: the Triton tests autotune every new shape and take minutes on their own.
# Usage: bench/gpu_check.sh OUT_DIR [all|tests|bench]
set -uo pipefail
MODE=${2:-all}
if [ $# -lt 1 ] || [ $# -gt 2 ] || [[ ! $MODE =~ ^(all|tests|bench)$ ]]; then
    echo "usage: $0 OUT_DIR [all|tests|bench]" >&2; exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export NANOLM_CUDA_ARCHS=${NANOLM_CUDA_ARCHS:-90a}  # only the local Hopper GPU: a fast build
# A checkout copied without .git (as the GPU machine gets it) names its commit here.
NANOLM_GIT_COMMIT=${NANOLM_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export NANOLM_GIT_COMMIT
BUDGET=${NANOLM_CHECK_BUDGET_S:-540}
FAILED=()

left() {  # left CAP: seconds the next step may take, min(CAP, what is left of the budget), >= 1
    local rest=$((BUDGET - SECONDS))
    [ "$rest" -lt "$1" ] || rest=$1
    [ "$rest" -gt 0 ] || rest=1
    echo "$rest"
}

step() {  # step NAME CAP_S CMD...: run with a time limit, log to OUT/NAME.log, remember failure
    local name=$1 cap=$2; shift 2
    local limit; limit=$(left "$cap")
    echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/steps.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc -eq 124 ] && echo "   killed at its time limit" | tee -a "$OUT/steps.log"
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
        echo "git_commit: $NANOLM_GIT_COMMIT$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes or no git)')"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
        $PY -c "import torch, triton; print('torch:', torch.__version__, 'cuda', torch.version.cuda); print('triton:', triton.__version__)"
        echo "nvcc: $(nvcc --version 2>/dev/null | tail -1)"
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
}

gpu_tests() {  # pytest exits 5 when no test is marked gpu yet: not a failure
    $PY -m pytest -m gpu -q tests; local rc=$?; [ $rc -eq 5 ] && return 0; return $rc
}

sanitize() {  # sanitize TOOL PYTEST_ARGS...: the CUDA kernels under compute-sanitizer (slow: few shapes)
    local tool=$1; shift
    compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all $PY -m pytest -m gpu -q "$@"
}

export -f build env_file gpu_tests sanitize
export PY OUT
step env 30 bash -c env_file
step nvidia-smi 30 nvidia-smi
step build 240 bash -c build
[ -f "$OUT/.fallback" ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step info 60 $PY -m nanolm.info
if [ "$MODE" != bench ]; then
    step pytest-gpu $([ "$MODE" = tests ] && echo 420 || echo 150) bash -c gpu_tests
    # attention at head size 128, T = 17 and 1000 (partial last blocks), the qkv layout; the
    # other CUDA kernels at an awkward width; racecheck on the attention backward's shared memory
    step memcheck 150 bash -c 'sanitize memcheck tests/test_attention_cuda.py -k "test_matches_float64_reference and dtype0 and 128 and qkv and (17 or 1000)" && sanitize memcheck tests/test_layernorm.py tests/test_cross_entropy.py tests/test_adamw.py -k "cuda and (777 or 1000)"'
    step racecheck 90 bash -c 'sanitize racecheck tests/test_attention_cuda.py -k "test_deterministic and dtype0"'
fi
[ "$MODE" != tests ] && step bench 330 $PY -m bench --quick --out "$OUT"
[ -f "$OUT/.fallback" ] && rm -f nanolm/kernels "$OUT/.fallback"

echo "total $SECONDS s" | tee -a "$OUT/steps.log"
if [ ${#FAILED[@]} -ne 0 ]; then echo "FAILED steps: ${FAILED[*]} (logs in $OUT)"; exit 1; fi
echo "all steps passed; results in $OUT"
