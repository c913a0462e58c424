#!/usr/bin/env bash
# Verify megatron-null-moe on a lent GPU machine in one device call: the last of the six in
# README ("Verify on a GPU"). Installs the Megatron-Core and Transformer Engine wheels that
# ../shared/gpu/prepare.sh staged (.gpu/p0..p4 already copied to /root/stage, .gpu/p5
# carried by this call), runs tests/test_gpu.py, then the MoE layer benchmark over every path
# (upstream, plugin with Megatron's experts, lean) and precision (bf16, fp8), with kernels and
# host syncs per step. Logs and JSON go to $OUT (6 files); the summary table is printed last.
# Fits one 10-minute call: the benchmark stops starting configurations in time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget_s=${VERIFY_BUDGET_S:-560}
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
tail -n 1 "$out/install.log"
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import megatron.core, transformer_engine; print('megatron-core', megatron.core.__version__, 'transformer-engine', transformer_engine.__version__)" >> "$out/environment.txt" 2>&1

timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_gpu.py \
  > "$out/gpu_tests.log" 2>&1
tests_status=$?
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$out/gpu_tests.log" | tail -n 20

left=$(( budget_s - (SECONDS - started) ))
python3 benchmarks/moe_layer_benchmark.py --preset h100 --warmup 3 --repeats 10 \
  --max-seconds $(( left > 150 ? left - 120 : 30 )) --output "$out/benchmark.json" \
  > "$out/benchmark.log" 2>&1
bench_status=$?

python3 - "$out" "$tests_status" "$bench_status" <<'PY' | tee "$out/summary.txt"
import json, sys
sys.path.insert(0, "benchmarks")
import moe_layer_benchmark as bench
out, tests_status, bench_status = sys.argv[1:]
print(open(f"{out}/environment.txt").read().strip())
print(f"tests/test_gpu.py exit status {tests_status}; benchmark exit status {bench_status}")
try:
    result = json.load(open(f"{out}/benchmark.json"))
except (OSError, ValueError) as error:
    print(f"no benchmark JSON: {error}")
else:
    print(" ".join(f"{k}={v}" for k, v in result["meta"].items()))
    print(bench.table(result["rows"], result["targets"]))
PY
