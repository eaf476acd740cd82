#!/usr/bin/env bash
# GPU check of the Triton kernels, for one CUDA device; ends within 8 minutes on an H100.
#   1. The kernel tests, compiled (no interpreter): one pytest process per file, so Triton
#      compiles their kernels in parallel on the host's cores.
#   2. bench/gpu_check.py: ours vs torch eager vs torch.compile, printed as a table and
#      written as JSON (default bench/results/gpu_check_<device>_<date>.json).
# Usage: bench/gpu_check.sh [--out PATH] [--budget-s S]
#        bench/gpu_check.sh --dry-run [--out PATH]   (CPU, interpreter, tiny shapes: checks the
#                                                     script; the tests then are the CPU suite's)
# Exit status: non-zero if a test file failed or the benchmark could not run.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}

dry=0
for arg in "$@"; do [[ $arg == --dry-run ]] && dry=1; done

status=0
if (( dry )); then
  export TRITON_INTERPRET=1
else
  export TRITON_INTERPRET=0
  logs=$(mktemp -d)
  files=(tests/test_kernel_*.py tests/test_triton_backend.py)
  pids=()
  for f in "${files[@]}"; do
    timeout 270 "$PY" -m pytest -q -p no:cacheprovider "$f" >"$logs/$(basename "$f").log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      echo "PASS ${files[$i]}: $(tail -n 1 "$logs/$(basename "${files[$i]}").log")"
    else
      echo "FAIL ${files[$i]}:"; tail -n 40 "$logs/$(basename "${files[$i]}").log"; status=1
    fi
  done
fi

"$PY" bench/gpu_check.py "$@" || status=1
exit $status
