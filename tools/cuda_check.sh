#!/usr/bin/env bash
# Check the cuda backend on a GPU machine in one go (written for the H100 device machine: python3
# with torch built for CUDA, nvcc, compute-sanitizer, no internet):
#
#     bash tools/cuda_check.sh                 # build test bench memcheck racecheck
#     bash tools/cuda_check.sh build test      # a subset of: build test suite bench memcheck racecheck
#
# Logs go to $OUT (default /tmp/ectfast_cuda_check), at most 8 files: env.log, build.log,
# test_cuda.log, suite.log (the whole test suite, only when asked for), bench.log, memcheck.log,
# racecheck.log, and summary.txt (one line per step: exit status, limit, seconds; a final
# "overall" line). The script's exit status is 0 only when every step it ran passed.
#
# Time: the steps share one deadline, CALL_SECONDS (default 570 s, inside a 600 s device call):
# a step gets min(its own limit, the time left), and a step with < 20 s left is skipped (said so
# in summary.txt), so summary.txt is always complete when the call returns.
#
# Eigen: the system's (/usr/include/eigen3) when CMake finds it; else, when the call carries
# .devdata/eigen3.tar.gz (a tar of PyPI cmeel-eigen's cmeel.prefix: include/eigen3 +
# share/eigen3/cmake, made on the development machine, see docs/DEVICE_RUNBOOK.md), that copy.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ectfast_cuda_check}"
mkdir -p "$OUT"
STEPS="${*:-build test bench memcheck racecheck}"
PY="${PYTHON:-python3}"
CALL_SECONDS="${CALL_SECONDS:-570}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=()
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# only the GPU at hand (sm_90 for H100/H200) keeps the build short; override with CUDAARCHS
export CUDAARCHS="${CUDAARCHS:-90-real}"
export ECTFAST_CUDA=ON  # fail loudly here rather than silently building CPU-only
export PATH="$PATH:/usr/local/cuda/bin"  # nvcc, compute-sanitizer

for s in $STEPS; do
  case $s in build|test|suite|bench|memcheck|racecheck) ;;
    *) echo "tools/cuda_check.sh: unknown step '$s' (steps: build test suite bench memcheck racecheck)" >&2; exit 2 ;;
  esac
done
has() { [[ " $STEPS " == *" $1 "* ]]; }

note() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME LIMIT_S COMMAND...  (log: $OUT/NAME.log)
  local name=$1 limit=$2
  shift 2
  local left=$((CALL_SECONDS - SECONDS - 5))
  if [ "$left" -lt 20 ]; then
    note "$name SKIPPED: out of time (${SECONDS}s of CALL_SECONDS=${CALL_SECONDS}s used)"
    FAILED+=("$name")
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  echo "=== $name: $*" >> "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok
  [ "$rc" = 0 ] || verdict=FAILED
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && verdict="FAILED (time limit)"
  note "$name rc=$rc $verdict ${limit}s-limit took=$((SECONDS - t0))s"
  [ "$rc" = 0 ] || FAILED+=("$name")
  return $rc
}

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
  /usr/local/cuda*/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer 2>/dev/null | head -1)
{
  date -u
  nvidia-smi || echo "nvidia-smi: none (no GPU driver here)"
  nvcc --version || true
  echo "compute-sanitizer: ${SANITIZER:-not found}"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || true
  "$PY" -c "import scikit_build_core, pybind11; print('scikit-build-core', scikit_build_core.__version__, 'pybind11', pybind11.__version__)" || true
  "$PY" -c "import numpy, cv2; print('numpy', numpy.__version__, 'opencv', cv2.__version__)" || true
  ls -d /usr/include/eigen3 /usr/share/eigen3/cmake /usr/lib/cmake/eigen3 2>&1 || true
} > "$OUT/env.log" 2>&1
note "gpu: ${GPU_NAME:-none}"

if has build; then
  if [ ! -f /usr/include/eigen3/Eigen/Core ] && [ -f .devdata/eigen3.tar.gz ]; then
    mkdir -p /tmp/ectfast_eigen && tar -xzf .devdata/eigen3.tar.gz -C /tmp/ectfast_eigen \
      && export CMAKE_PREFIX_PATH="/tmp/ectfast_eigen${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}" \
      && note "eigen: the carried .devdata/eigen3.tar.gz (no /usr/include/eigen3)"
  fi
  step build 420 "$PY" -m pip install --no-build-isolation --no-deps -v .
  rc=$?
  if [ "$rc" != 0 ] && grep -qs "externally-managed-environment" "$OUT/build.log"; then
    FAILED=("${FAILED[@]/build}")
    step build 420 "$PY" -m pip install --no-build-isolation --no-deps --break-system-packages -v .
    rc=$?
  fi
  if [ "$rc" != 0 ] && [ "$rc" != 124 ] && [ "$rc" != 137 ] && ! grep -qs "^ *FAILED: " "$OUT/build.log"; then
    # pip failed before compiling (no pip, scikit-build-core missing or too old, ...): build with
    # CMake and use python/ with the .so. A compile error (ninja's "FAILED:") is not retried.
    FAILED=("${FAILED[@]/build}")
    step build 420 bash -c "cmake -S . -B build/cuda_check -G Ninja -DECTFAST_CUDA=ON \
      -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DPython_EXECUTABLE=\$(command -v $PY) \
      && cmake --build build/cuda_check && cp build/cuda_check/_core*.so python/ectfast/"
    rc=$?
    [ "$rc" = 0 ] && note "using python/ with the CMake-built extension (pip install failed, see build.log)"
  fi
  [ "$rc" = 0 ] || note "build failed: the end of build.log says why (compile errors: grep -n 'error' build.log)"
fi
# use the source tree when the package is not installed (or the .so was copied there)
RUN_ENV=()
if ! (cd /tmp && "$PY" -c "import ectfast.core._core" 2>/dev/null); then
  RUN_ENV=(env "PYTHONPATH=$PWD/python")
fi
BACKENDS=$("${RUN_ENV[@]}" "$PY" -c "import ectfast, ectfast.core._core as c; print(' '.join(ectfast.backends()), '| devices', c.cuda_device_count(), '| cuda_built', c.cuda_built, '|', ectfast.__file__)" 2>>"$OUT/env.log")
note "backends: ${BACKENDS:-none (ectfast.core._core does not import; see env.log)}"
GPU_OK=0
if [[ " $BACKENDS " == *" cuda "* ]]; then
  GPU_OK=1
elif [ -n "$GPU_NAME" ]; then
  note "FAIL: a GPU is present ($GPU_NAME) but the cuda backend is not available: GPU tests would only skip"
  FAILED+=("cuda-backend")
fi

if has test; then
  step test_cuda 240 "${RUN_ENV[@]}" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
  [ "$GPU_OK" = 1 ] || note "test_cuda: the GPU tests were skipped (no cuda backend/GPU here)"
fi
if has suite; then  # the whole suite under this machine's Python/numpy/torch (data tests skip)
  step suite 300 "${RUN_ENV[@]}" "$PY" -m pytest -q -rs -p no:cacheprovider -x tests
fi
if has bench; then
  if [ "$GPU_OK" = 1 ]; then
    step bench 300 "${RUN_ENV[@]}" "$PY" bench/fit_cuda.py
  else
    note "bench SKIPPED: no cuda backend/GPU here (bench/fit_cuda.py needs one)"
  fi
fi
# the sanitizers slow kernels 10-100x: run the op-level tests and small fits only. Without
# torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees out-of-bounds
# accesses at tensor granularity instead of inside torch's memory pool.
for tool in memcheck racecheck; do
  has $tool || continue
  if [ "$GPU_OK" != 1 ]; then
    note "$tool SKIPPED: no cuda backend/GPU here"
  elif [ -z "$SANITIZER" ]; then
    note "$tool SKIPPED: compute-sanitizer not found"
    FAILED+=("$tool")
  elif [ $tool = memcheck ]; then
    step memcheck 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${RUN_ENV[@]}" "$SANITIZER" --tool memcheck --error-exitcode 3 --leak-check no \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "patch_ops_match_reference or argmax_first or parity_single or all_zero or upsample_on_the_fly or bad_inputs"
  else
    step racecheck 240 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${RUN_ENV[@]}" "$SANITIZER" --tool racecheck --racecheck-report all --error-exitcode 3 \
      "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py -k "patch_ops_match_reference and 30 or argmax_first or parity_single"
  fi
done
FAILED=(${FAILED[@]+${FAILED[@]}})  # unquoted: drops the emptied entries of retried builds
if [ ${#FAILED[@]} = 0 ]; then
  note "overall: ok (${SECONDS}s; logs in $OUT)"
  exit 0
fi
note "overall: FAILED: ${FAILED[*]} (${SECONDS}s; logs in $OUT)"
exit 1
