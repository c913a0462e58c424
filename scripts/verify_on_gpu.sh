#!/usr/bin/env bash
# Verify megatron-null-moe on a lent GPU machine in one device call: the last of the six in
# docs/benchmark.md ("Verify on a GPU"). Installs the Megatron-Core and Transformer Engine wheels that
# ../shared/gpu/prepare.sh staged (.gpu/p0..p4 already copied to /root/stage, .gpu/p5
# carried by this call), runs tests/test_gpu.py, then the MoE layer benchmark over every path
# (upstream, plugin with Megatron's experts, lean with both buffers) and precision (bf16, fp8)
# at the budget: each rho<1 row's router holds its realised real fraction at rho (a row off by
# more than 0.01 is an error, not a time), with aten ops, kernels and host syncs per step.
# Logs and JSON go to $OUT (6 files); the summary table is printed last.
# Exits non-zero when the tests or the benchmark failed (or pytest was missing).
#
# Here, before the device calls: `bash scripts/verify_on_gpu.sh --stage-pytest` adds pytest's
# wheels to .gpu/p5 (the GPU image may have no pytest; prepare.sh stages none).
#
# Fits one device call of VERIFY_BUDGET_S (default 420 s) with margin, so that the machine's
# start and the five staging calls stay inside the session's device time: the benchmark stops
# starting configurations in time, is killed (timeout) before the budget ends, and rewrites
# its JSON after every configuration, so what ran comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--stage-pytest" ]; then
  mkdir -p .gpu/p5
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    -d .gpu/p5 pytest pluggy iniconfig packaging pygments
fi
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget_s=${VERIFY_BUDGET_S:-420}
started=$SECONDS

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/environment.txt" 2>&1

if python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import megatron.core, transformer_engine" 2>/dev/null; then
  echo "megatron-core and Transformer Engine already in /tmp/site" > "$out/install.log"
else
  bash .gpu/p5/install.sh > "$out/install.log" 2>&1 || { cat "$out/install.log"; echo "install failed"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD
if ! python3 -c "import pytest" 2>/dev/null && ls .gpu/p5/pytest-*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site \
    .gpu/p5/{pytest,pluggy,iniconfig,packaging,pygments}-*.whl \
    >> "$out/install.log" 2>&1  # already there when install.sh ran; not when it was skipped
fi
tail -n 1 "$out/install.log"
python3 -c "import megatron.core, transformer_engine; print('megatron-core', megatron.core.__version__, 'transformer-engine', transformer_engine.__version__)" >> "$out/environment.txt" 2>&1

if python3 -c "import pytest" 2> /dev/null; then
  timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_gpu.py \
    > "$out/gpu_tests.log" 2>&1
  tests_status=$?
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$out/gpu_tests.log" | tail -n 20
else
  echo "pytest is not importable on this machine and no pytest wheels were staged:" \
    "tests/test_gpu.py NOT run. Stage them here with" \
    "'bash scripts/verify_on_gpu.sh --stage-pytest' before the .gpu/p5 call." \
    | tee "$out/gpu_tests.log"
  tests_status=3
fi

# The benchmark stops starting configurations 60 s before the budget's end and is killed 20 s
# before it (its JSON holds every configuration that finished).
left=$(( budget_s - (SECONDS - started) ))
timeout --kill-after=5 $(( left > 80 ? left - 20 : 60 )) \
  python3 benchmarks/moe_layer_benchmark.py --preset h100 --warmup 3 --repeats 10 \
  --max-seconds $(( left > 90 ? left - 60 : 30 )) --output "$out/benchmark.json" \
  > "$out/benchmark.log" 2>&1
bench_status=$?

python3 - "$out" "$tests_status" "$bench_status" <<'PY' | tee "$out/summary.txt"
import json, sys
sys.path.insert(0, "benchmarks")
import moe_layer_benchmark as bench
out, tests_status, bench_status = sys.argv[1:]
print(open(f"{out}/environment.txt").read().strip())
print(f"tests/test_gpu.py exit status {tests_status}; benchmark exit status {bench_status}"
      + (" (killed by timeout: rows so far)" if bench_status in ("124", "137") else ""))
try:
    result = json.load(open(f"{out}/benchmark.json"))
except (OSError, ValueError) as error:
    print(f"no benchmark JSON: {error}")
else:
    print(" ".join(f"{k}={v}" for k, v in result["meta"].items()))
    print(bench.table(result["rows"], result["targets"]))
PY
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
  echo "FAILED: tests/test_gpu.py exit status $tests_status, benchmark exit status $bench_status"
  exit 1
fi
