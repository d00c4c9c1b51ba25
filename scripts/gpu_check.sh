#!/usr/bin/env bash
# One-shot GPU check: the whole test suite on CuPy, then the GPU table of `minisd bench`.
#
#   bash scripts/gpu_check.sh            # logs in $OUT if set, else in a new temporary folder
#
# Each step is cut off by `timeout` (install 2 min, tests 5.5 min, benchmark 3 min: about 10
# minutes at worst), and what it printed so far stays in its log.
#
# Offline GPU machines: the project's device machines cannot reach a package index but already
# have CuPy (cupy-cuda13x), PyTorch, pytest and the runtime dependencies. So extras are installed
# only for what is missing: if CuPy already imports, the gpu extra (cupy-cuda12x) is NOT installed
# beside it (two CuPy packages in one environment break each other).
#
# Logs ($OUT): env.log (GPU and versions), install.log, pytest_cupy.log, bench_gpu.log, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d -t minisd-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
started=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/summary.txt"; }

stamp "logs in $OUT"
{
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" --version
    "$PY" -c "import numpy; print('numpy', numpy.__version__)"
    "$PY" -c "import cupy; print('cupy', cupy.__version__, 'devices:', cupy.cuda.runtime.getDeviceCount())"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda:', torch.cuda.is_available())"
} >"$OUT/env.log" 2>&1
grep -E '^(numpy|cupy|torch) ' "$OUT/env.log" | tee -a "$OUT/summary.txt"

# ---- install: only the extras that are missing ---------------------------------------------------
extras=()
"$PY" -c "import cupy" 2>/dev/null || extras+=(gpu)
"$PY" -c "import pytest" 2>/dev/null || extras+=(test)
if [ ${#extras[@]} -eq 0 ]; then
    stamp "CuPy and pytest present: installing minisd without dependencies"
    timeout 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1
else
    spec=".[$(IFS=,; echo "${extras[*]}")]"
    stamp "installing $spec"
    timeout 120 "$PY" -m pip install --retries 1 --timeout 15 -e "$spec" >"$OUT/install.log" 2>&1
fi
if ! "$PY" -c "import minisd" >>"$OUT/install.log" 2>&1; then
    stamp "install failed (see install.log); running from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---- is the GPU usable for minisd? ---------------------------------------------------------------
if ! MINISD_BACKEND=cupy "$PY" -c "from minisd import backend; print('minisd backend:', backend.name())" \
        >>"$OUT/summary.txt" 2>&1; then
    stamp "MINISD_BACKEND=cupy does not start; see summary.txt"
    exit 2
fi

# ---- the whole test suite on CuPy ----------------------------------------------------------------
# Notebook execution is left out (it needs Jupyter, which offline GPU machines lack, and it tests
# teaching material, not array code); everything else runs with MINISD_BACKEND=cupy.
ignore=()
for nb in tests/test_notebook*.py; do [ -e "$nb" ] && ignore+=("--ignore=$nb"); done
stamp "pytest with MINISD_BACKEND=cupy ${ignore[*]}"
MINISD_BACKEND=cupy timeout 330 "$PY" -m pytest -q -ra -p no:cacheprovider --maxfail=30 --durations=15 \
    "${ignore[@]}" 2>&1 | tee "$OUT/pytest_cupy.log" | tail -n 40
status_tests=${PIPESTATUS[0]}
stamp "pytest exit status $status_tests: $(grep -E '(passed|failed|error)' "$OUT/pytest_cupy.log" | tail -n 1)"

# ---- the benchmark -------------------------------------------------------------------------------
stamp "minisd bench gpu"
timeout 180 "$PY" -m minisd.cli bench gpu 2>&1 | tee "$OUT/bench_gpu.log"
status_bench=${PIPESTATUS[0]}
stamp "minisd bench gpu exit status $status_bench"
cat "$OUT/bench_gpu.log" >>"$OUT/summary.txt"

stamp "done"
[ "$status_tests" -eq 0 ] && [ "$status_bench" -eq 0 ]
