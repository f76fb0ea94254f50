#!/usr/bin/env bash
# Check the cuda backend on a GPU machine in one go (written for the H100 device machine: Eigen in
# /usr/include/eigen3, python3 with torch built for CUDA, no internet):
#
#     bash tools/cuda_check.sh                 # all steps
#     bash tools/cuda_check.sh build test      # a subset: build test memcheck racecheck bench
#
# Logs go to $OUT (default /tmp/ectfast_cuda_check): env.log, build.log, test_cuda.log, memcheck.log,
# racecheck.log, bench.log, and summary.txt (one line per step with its exit status and seconds).
# Every step has its own time limit so that a full run stays under ~10 minutes; on a 10-minute
# budget run "build test bench" and "build memcheck racecheck" as two calls if it gets tight.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ectfast_cuda_check}"
mkdir -p "$OUT"
STEPS="${*:-build test memcheck racecheck bench}"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# only the GPU at hand (sm_90 for H100/H200) keeps the build short; override with CUDAARCHS
export CUDAARCHS="${CUDAARCHS:-90-real}"
export ECTFAST_CUDA=ON  # fail loudly here rather than silently building CPU-only
export PATH="$PATH:/usr/local/cuda/bin"  # nvcc, compute-sanitizer

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" >> "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - t0))s" | tee -a "$SUMMARY"
  return $rc
}

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" || true
  "$PY" -c "import scikit_build_core, pybind11; print('scikit-build-core', scikit_build_core.__version__, 'pybind11', pybind11.__version__)" || true
} > "$OUT/env.log" 2>&1

# how tests and the bench find the package: the installed one, else python/ with the built .so
RUN_ENV=()

has() { [[ " $STEPS " == *" $1 "* ]]; }

if has build; then
  if ! step build 420 "$PY" -m pip install --no-build-isolation --no-deps -v . ; then
    # externally-managed interpreters refuse a plain install; then try a plain CMake build
    if ! step build 420 "$PY" -m pip install --no-build-isolation --no-deps --break-system-packages -v . ; then
      step build 420 bash -c "cmake -S . -B build/cuda_check -G Ninja -DECTFAST_CUDA=ON \
        -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) -DPython_EXECUTABLE=\$(command -v $PY) \
        && cmake --build build/cuda_check && cp build/cuda_check/_core*.so python/ectfast/" \
        && echo "using python/ with the CMake-built extension" >> "$SUMMARY"
    fi
  fi
fi
# use the source tree when the package is not installed (or the .so was copied there)
if ! (cd /tmp && "$PY" -c "import ectfast._core" 2>/dev/null); then
  RUN_ENV=(env "PYTHONPATH=$PWD/python")
fi
"${RUN_ENV[@]}" "$PY" -c "import ectfast, ectfast._core as c; print('backends', ectfast.backends(), 'devices', c.cuda_device_count(), ectfast.__file__)" >> "$OUT/env.log" 2>&1

if has test; then
  step test_cuda 240 "${RUN_ENV[@]}" "$PY" -m pytest -q -rs tests/test_cuda.py
fi
# the sanitizers slow kernels 10-100x: run the op-level tests and small fits only. Without
# torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees out-of-bounds
# accesses at tensor granularity instead of inside torch's memory pool.
if has memcheck; then
  step memcheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${RUN_ENV[@]}" compute-sanitizer --tool memcheck --error-exitcode 3 --leak-check no \
    "$PY" -m pytest -q -x tests/test_cuda.py -k "patch_ops_match_reference or argmax_first or parity_single or all_zero or upsample_on_the_fly or bad_inputs"
fi
if has racecheck; then
  step racecheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${RUN_ENV[@]}" compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
    "$PY" -m pytest -q -x tests/test_cuda.py -k "patch_ops_match_reference and 30 or argmax_first or parity_single"
fi
if has bench; then
  step bench 300 "${RUN_ENV[@]}" "$PY" bench/fit_cuda.py
fi
echo "logs in $OUT" | tee -a "$SUMMARY"
