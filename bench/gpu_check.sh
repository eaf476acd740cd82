#!/usr/bin/env bash
# GPU check of the Triton kernels on one CUDA device, in one call: 450 s by default (--budget-s),
# which leaves room inside 8 minutes on an H100/H200.
#   1. The kernel tests compiled (no interpreter): tests/test_kernel_*.py, test_kernel_cuda.py's
#      mid shapes among them (not test_kernel_compile.py, which needs no device), and
#      tests/test_triton_backend.py, one pytest process per file in parallel (Triton compiles on
#      all host cores), each stopped at 40% of the budget.
#   2. bench/gpu_check.py with the rest of the budget: ours vs eager vs torch.compile (default and
#      max-autotune) vs a cuBLAS GEMM, output checks, determinism, registers and spills, peak
#      memory, the SAELens step; JSON and markdown under bench/results/ (see its docstring).
# Usage: bench/gpu_check.sh [--budget-s S] [--out PATH.json]
#        bench/gpu_check.sh --dry-run [--out PATH.json]   (CPU, interpreter, tiny shapes: checks the
#                                                          script; the tests then are the CPU suite's)
# Needs esosae importable (pip install --no-deps -e . and its imports, nvtx among them).
# Exit status: non-zero if a test file failed or timed out, or gpu_check.py failed (a case raised,
# a check failed, or it could not run).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
start=$SECONDS

budget=450 dry=0 args=()
while (( $# )); do
  case $1 in
    --budget-s) budget=${2:?--budget-s needs a number of seconds}; shift 2 ;;
    --budget-s=*) budget=${1#*=}; shift ;;
    --dry-run) dry=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
budget=${budget%.*}
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget-s takes whole seconds (got $budget)" >&2; exit 2; }

status=0
if (( dry )); then
  export TRITON_INTERPRET=1
else
  export TRITON_INTERPRET=0
  if ! err=$("$PY" -c "import esosae.kernels, esosae.training.loop" 2>&1); then
    echo "gpu_check.sh: esosae does not import with $PY (${err##*$'\n'}); install it first:" \
         "pip install --no-deps -e . and what it imports (nvtx, tqdm, safetensors)" >&2
    exit 2
  fi
  logs=$(mktemp -d)
  # test_kernel_compile.py stays with the CPU suite: it compiles for sm_80/89/90 without a device,
  # the same on any machine, and would take the host's cores from the tests that need the GPU.
  files=()
  for f in tests/test_kernel_*.py tests/test_triton_backend.py; do
    [[ $f == tests/test_kernel_compile.py ]] || files+=("$f")
  done
  limit=$(( budget * 40 / 100 ))  # 180 s of the default 450
  pids=()
  for f in "${files[@]}"; do
    timeout -k 10 "$limit" "$PY" -m pytest -q -p no:cacheprovider "$f" >"$logs/$(basename "$f").log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    log="$logs/$(basename "${files[$i]}").log"
    wait "${pids[$i]}"; rc=$?
    if (( rc == 0 )); then
      echo "PASS ${files[$i]}: $(tail -n 1 "$log")"
    elif (( rc == 124 || rc == 137 )); then
      echo "FAIL ${files[$i]}: timed out after ${limit} s:"; tail -n 20 "$log"; status=1
    else
      echo "FAIL ${files[$i]}:"; tail -n 40 "$log"; status=1
    fi
  done
  echo "tests took $(( SECONDS - start )) s"
fi

left=$(( budget - (SECONDS - start) - 15 ))  # 15 s to write the results
(( left < 0 )) && left=0
# A hard stop 30 s past the budget (a compile cannot be interrupted); gpu_check.py rewrites its
# JSON and markdown after every case, so a stopped run keeps what it measured.
timeout -k 5 $(( left + 30 )) "$PY" bench/gpu_check.py "${args[@]}" --budget-s "$left" || status=1
echo "gpu_check.sh took $(( SECONDS - start )) s"
exit $status
