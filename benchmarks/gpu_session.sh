#!/usr/bin/env bash
# What a session with a lent GPU runs, in as few device calls as possible (each call may last 10 minutes):
#   bash benchmarks/gpu_session.sh check   # versions; build regkern._C for this GPU; pytest -m gpu (incl. sanitizer)
#   bash benchmarks/gpu_session.sh bench   # python -m regkern bench + the measured triton-vs-cuda dispatch table
# Logs and results go under $OUT (the device tool's output folder) or ./gpu-out; the last lines printed are a short
# summary. Commit the bench folder as benchmarks/results/<date>-<gpu>/ and the table as regkern/ops/dispatch_table.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
step="${1:-check}"

# this GPU's architecture only (a faster build than the default sm_80 + sm_90); the CUDA toolkit is the one behind the
# nvcc on PATH (setup.py and regkern.ops.cuda_ext find it, also behind a wrapper script) unless CUDA_HOME names one
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}"
export MAX_JOBS="${MAX_JOBS:-16}"
"$py" - <<'PY' | tee "$out/environment.txt"
import subprocess, torch, triton
print("gpu", torch.cuda.get_device_name(), "sm_%d%d" % torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print(subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip())
PY

if [ "$step" = "check" ]; then
  start=$(date +%s)
  REGKERN_BUILD_CUDA=1 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
  echo "build rc=$? in $(( $(date +%s) - start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  "$py" -c "import regkern; print(regkern.cuda_ext.load())"
  timeout 480 "$py" -m pytest tests -m gpu -q -p no:cacheprovider -x --junitxml="$out/gpu_tests.xml" \
    > "$out/gpu_tests.log" 2>&1
  echo "pytest -m gpu rc=$?"
  tail -25 "$out/gpu_tests.log"
elif [ "$step" = "bench" ]; then
  [ -f regkern/_C*.so ] 2>/dev/null || REGKERN_BUILD_CUDA=1 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1
  timeout 560 "$py" -m regkern bench --out "$out/bench" --dispatch-table "$out/dispatch_table.json" \
    > "$out/bench.log" 2>&1
  echo "regkern bench rc=$?"
  tail -40 "$out/bench.log"
else
  echo "usage: $0 check|bench" >&2
  exit 2
fi
