#!/usr/bin/env bash
# Verify megatron-null-moe on a GPU machine: runs tests/test_gpu.py (marker gpu), then the MoE
# layer benchmark (benchmarks/moe_layer_benchmark.py --preset h100) over every path (upstream,
# plugin with Megatron's experts, lean with both buffers) and precision (BF16, FP8), and prints
# the summary table last. See docs/benchmark.md, "Verify on a GPU".
#
# Usage:
#   bash scripts/verify_on_gpu.sh [--wheels DIR] [-- BENCHMARK_OPTIONS...]
#   WHEELS=DIR bash scripts/verify_on_gpu.sh
#   bash scripts/verify_on_gpu.sh --download-wheels DIR [--python-version 3.12]
#                                 [--platform manylinux_2_28_x86_64]
#
# Needs: an NVIDIA GPU visible to torch, megatron-core 0.19.x and Transformer Engine importable
# (NVIDIA's PyTorch container built by docker/Dockerfile, see docs/docker.md, or pip-installed),
# and pytest. This checkout is put first on PYTHONPATH (an installed copy of the plugin, e.g.
# `pip install --no-deps -e .`, is not needed); a PYTHONPATH the caller set is kept, so
# megatron-core and Transformer Engine may come from there. Nothing is installed unless
# --wheels DIR (or WHEELS=DIR) is given. A missing prerequisite is named on one line each, with
# how to get it, and the script exits with status 2 before running anything.
#
# Without network on the GPU machine (optional):
#   --download-wheels DIR  on a machine with network: pip downloads into DIR the wheels the GPU
#       machine may lack: megatron-core==0.19.2 with numpy and packaging (not torch: the GPU
#       environment's own), and pytest with its dependencies. --python-version and --platform
#       (pip's options) name the GPU machine's Python and platform when this one differs.
#   --wheels DIR (or WHEELS=DIR)  on the GPU machine: installs from DIR, only what does not
#       import (pip install --no-index --find-links DIR; megatron-core with --no-deps, so that
#       torch and Transformer Engine are never replaced); its output goes to $OUT/install.log.
#
# Writes to $OUT (default: the checkout's outputs/gpu): environment.txt (GPU, driver,
# versions), gpu_tests.log, benchmark.log, benchmark.json (rewritten by the benchmark after
# each configuration), summary.txt (the table with the targets), prerequisites.log (the import
# errors of a missing prerequisite), and install.log with --wheels. OUT, WHEELS and DIR may be
# relative to the folder the script is called from.
# Options after `--` go to the benchmark (e.g. `-- --warmup 3 --repeats 10`).
#
# VERIFY_BUDGET_S=N (default: no limit): keep the whole run to about N seconds. The GPU tests
# may use half of it; the benchmark stops starting configurations 60 s before the end (they are
# listed as skipped) and is killed 20 s before it; benchmark.json keeps every finished row.
# PYTHON (default python3) names the interpreter.
#
# Exit status: 0 when the GPU tests and the benchmark passed, 1 when either failed (or was
# killed at the budget), 2 for a missing prerequisite or a usage error.
set -uo pipefail
caller=$PWD  # folders given relative to where the script was called from
cd "$(dirname "$0")/.."
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$caller/$1" ;; esac; }

python=${PYTHON:-python3}
case "$python" in */*) python=$(absolute "$python") ;; esac  # a path: from the caller's folder
megatron_core_requirement="megatron-core==0.19.2"

usage() {
  sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//'
}

wheels=${WHEELS:+$(absolute "$WHEELS")}
download_dir=""
pip_target=()
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || { echo "--wheels needs a folder" >&2; exit 2; }
      wheels=$(absolute "$2"); shift 2 ;;
    --download-wheels) [ $# -ge 2 ] || { echo "--download-wheels needs a folder" >&2; exit 2; }
      download_dir=$(absolute "$2"); shift 2 ;;
    --python-version|--platform) [ $# -ge 2 ] || { echo "$1 needs a value" >&2; exit 2; }
      pip_target+=("$1" "$2"); shift 2 ;;
    --) shift; bench_args=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ ${#pip_target[@]} -gt 0 ] && [ -z "$download_dir" ]; then
  echo "--python-version and --platform go with --download-wheels DIR" >&2
  exit 2
fi

if ! command -v "$python" > /dev/null; then
  echo "missing: the Python interpreter $python (set PYTHON to the one with torch)" >&2
  exit 2
fi

# --- On a machine with network: download the wheels and stop. ---------------------------------
if [ -n "$download_dir" ]; then
  mkdir -p "$download_dir"
  "$python" -m pip download --only-binary=:all: --no-deps -d "$download_dir" \
    ${pip_target[@]+"${pip_target[@]}"} "$megatron_core_requirement" numpy packaging \
    || { echo "pip download of $megatron_core_requirement failed" >&2; exit 1; }
  "$python" -m pip download --only-binary=:all: -d "$download_dir" \
    ${pip_target[@]+"${pip_target[@]}"} pytest \
    || { echo "pip download of pytest failed" >&2; exit 1; }
  echo "wheels in $download_dir; on the GPU machine: bash scripts/verify_on_gpu.sh --wheels $download_dir"
  exit 0
fi

budget_s=${VERIFY_BUDGET_S:-0}
if ! [[ "$budget_s" =~ ^[0-9]+$ ]]; then
  echo "VERIFY_BUDGET_S must be a whole number of seconds (0: no limit), not '$budget_s'" >&2
  exit 2
fi
started=$SECONDS
out=${OUT:+$(absolute "$OUT")}
out=${out:-outputs/gpu}  # the checkout's
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

imports() {  # imports MODULE: whether $python imports it (errors go to prerequisites.log)
  "$python" -c "import $1" >> "$out/prerequisites.log" 2>&1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2> /dev/null | sed 's/^/megatron-null-moe commit /'
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  else
    echo "nvidia-smi not found"
  fi
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
} > "$out/environment.txt"
: > "$out/prerequisites.log"

# --- Optional: install what is missing from a folder of wheels. --------------------------------
if [ -n "$wheels" ]; then
  if [ ! -d "$wheels" ]; then
    echo "missing: the wheel folder $wheels (make it with --download-wheels on a machine with network)" >&2
    exit 2
  fi
  : > "$out/install.log"
  core=()
  imports "megatron.core" || core+=("$megatron_core_requirement")
  if [ ${#core[@]} -gt 0 ]; then
    imports numpy || core+=(numpy)
    imports packaging || core+=(packaging)
    # --no-deps: torch comes from this environment; PIP_CONSTRAINT cleared as in docker/Dockerfile.
    echo "installing from $wheels: ${core[*]}"
    PIP_CONSTRAINT= "$python" -m pip install --no-index --find-links "$wheels" --no-deps \
      "${core[@]}" >> "$out/install.log" 2>&1 \
      || { tail -n 5 "$out/install.log"; echo "pip install from $wheels failed (see $out/install.log)" >&2; exit 2; }
  fi
  if ! imports pytest; then
    echo "installing from $wheels: pytest"
    "$python" -m pip install --no-index --find-links "$wheels" pytest >> "$out/install.log" 2>&1 \
      || { tail -n 5 "$out/install.log"; echo "pip install from $wheels failed (see $out/install.log)" >&2; exit 2; }
  fi
fi

# --- Prerequisites: one line each for what is missing. ----------------------------------------
offline="or, without network, --wheels DIR from --download-wheels DIR (docs/benchmark.md)"
missing=0
say_missing() { echo "missing: $*" >&2; missing=$((missing + 1)); }
if ! imports torch; then
  say_missing "torch: install a CUDA build of PyTorch, or use NVIDIA's PyTorch container (docker/Dockerfile, docs/docker.md)"
elif ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" >> "$out/prerequisites.log" 2>&1; then
  say_missing "CUDA visible to torch (torch.cuda.is_available() is False): run on a machine with an NVIDIA GPU and driver, a CUDA build of torch, and in Docker 'docker run --gpus all'"
fi
core_version=$("$python" -c "import megatron.core; print(megatron.core.__version__)" \
  2>> "$out/prerequisites.log")
core_status=$?
core_version=${core_version##*$'\n'}  # the last line: the version, after anything printed on import
if [ "$core_status" -ne 0 ]; then
  say_missing "megatron.core (megatron-core 0.19.x): pip install --no-deps $megatron_core_requirement, $offline"
elif [[ "$core_version" != 0.19.* ]]; then
  say_missing "megatron-core 0.19.x (found $core_version): pip install --no-deps $megatron_core_requirement, $offline"
fi
if ! imports transformer_engine.pytorch; then
  say_missing "transformer_engine (Transformer Engine for PyTorch): use NVIDIA's PyTorch container (docker/Dockerfile, docs/docker.md) or pip install --no-build-isolation 'transformer_engine[pytorch]'"
fi
if ! imports pytest; then
  say_missing "pytest: pip install pytest, $offline"
fi
if [ "$missing" -gt 0 ]; then
  echo "$missing prerequisite(s) missing: nothing was run (details in $out/prerequisites.log)" >&2
  exit 2
fi
"$python" -c "import megatron.core, transformer_engine, megatron_null_moe; print('megatron-core', megatron.core.__version__, 'transformer-engine', transformer_engine.__version__, 'megatron-null-moe from', megatron_null_moe.__path__[0])" >> "$out/environment.txt" 2>&1
cat "$out/environment.txt"

# --- The GPU tests. ---------------------------------------------------------------------------
limit=()  # `timeout SECONDS` when VERIFY_BUDGET_S is set
if [ "$budget_s" -gt 0 ]; then
  limit=(timeout --kill-after=5 $(( budget_s / 2 > 60 ? budget_s / 2 : 60 )))
fi
echo "running tests/test_gpu.py (log: $out/gpu_tests.log)"
${limit[@]+"${limit[@]}"} "$python" -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_gpu.py \
  > "$out/gpu_tests.log" 2>&1
tests_status=$?
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error" "$out/gpu_tests.log" | tail -n 20

# --- The benchmark: every path and precision of the h100 preset. ------------------------------
# With a budget it stops starting configurations 60 s before the end and is killed 20 s before
# it; its JSON holds every configuration that finished.
limit=()
budget_options=()
if [ "$budget_s" -gt 0 ]; then
  left=$(( budget_s - (SECONDS - started) ))
  limit=(timeout --kill-after=5 $(( left > 80 ? left - 20 : 60 )))
  budget_options=(--max-seconds $(( left > 90 ? left - 60 : 30 )))
fi
echo "running benchmarks/moe_layer_benchmark.py --preset h100 (log: $out/benchmark.log)"
${limit[@]+"${limit[@]}"} "$python" benchmarks/moe_layer_benchmark.py --preset h100 \
  --output "$out/benchmark.json" ${budget_options[@]+"${budget_options[@]}"} \
  ${bench_args[@]+"${bench_args[@]}"} > "$out/benchmark.log" 2>&1
bench_status=$?

# --- The summary, last. -----------------------------------------------------------------------
"$python" - "$out" "$tests_status" "$bench_status" <<'PY' | tee "$out/summary.txt"
import json, sys
out, tests_status, bench_status = sys.argv[1:]
print(open(f"{out}/environment.txt").read().strip())
print(f"tests/test_gpu.py exit status {tests_status}; benchmark exit status {bench_status}"
      + (" (killed at VERIFY_BUDGET_S: the rows so far)" if bench_status in ("124", "137") else ""))
try:
    result = json.load(open(f"{out}/benchmark.json"))
except (OSError, ValueError) as error:
    print(f"no benchmark JSON: {error}")
else:
    sys.path.insert(0, "benchmarks")
    import moe_layer_benchmark as bench  # its table, with the targets
    print(" ".join(f"{k}={v}" for k, v in result["meta"].items()))
    print(bench.table(result["rows"], result["targets"]))
PY
if [ "$tests_status" -ne 0 ] || [ "$bench_status" -ne 0 ]; then
  echo "FAILED: tests/test_gpu.py exit status $tests_status, benchmark exit status $bench_status (logs in $out)"
  exit 1
fi
echo "passed: tests/test_gpu.py and the benchmark (logs in $out)"
