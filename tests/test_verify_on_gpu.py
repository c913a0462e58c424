"""scripts/verify_on_gpu.sh, run here with a stand-in `python3` on PATH: it checks the GPU
machine's prerequisites (one line each for what is missing), installs only from a wheel folder
it is given, runs tests/test_gpu.py and the h100 benchmark, and says by its exit status whether
both passed."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "verify_on_gpu.sh"

STUB = r"""#!/usr/bin/env bash
# python3 stand-in. An import fails when its name is in STUB_MISSING and pip has not installed
# it since; pip, pytest and the benchmark record their arguments in $STUB_STATE.
state=$STUB_STATE
missing() {
  case " $STUB_MISSING " in *" $1 "*) [ ! -e "$state/installed-$1" ] ;; *) return 1 ;; esac
}
case "$*" in
  "-m pip "*)
    echo "${*:3}" >> "$state/pip.log"
    for word in "$@"; do
      case "$word" in
        megatron-core==*) touch "$state/installed-megatron.core" ;;
        pytest|numpy) touch "$state/installed-$word" ;;
      esac
    done
    exit 0 ;;
  "-m pytest "*) echo "$*" > "$state/pytest.args"; echo "1 passed"; exit "$STUB_TESTS_RC" ;;
  benchmarks/*)
    echo "$*" > "$state/bench.args"
    if [ -n "${STUB_BENCH_JSON:-}" ]; then
      previous=""
      for word in "$@"; do
        [ "$previous" = "--output" ] && echo "$STUB_BENCH_JSON" > "$word"
        previous=$word
      done
    fi
    exit "$STUB_BENCH_RC" ;;
  "- "*) exec "$REAL_PYTHON" "$@" ;;  # the summary
  *"torch.cuda.is_available()"*) missing cuda && exit 1; exit 0 ;;
  "-c import megatron.core; print(megatron.core.__version__)")
    missing megatron.core && exit 1; echo "${STUB_CORE_VERSION:-0.19.2}"; exit 0 ;;
  "-c import "*) args="$*"; missing "${args#-c import }" && exit 1; exit 0 ;;  # "-c import pytest"
  *) exit 0 ;;
esac
"""

BENCH_JSON = json.dumps({
    "meta": {"preset": "h100"}, "targets": [],
    "rows": [{"precision": "bf16", "tokens": 16384, "config": "upstream K4 rho=1",
              "error": "stand-in row"}]})


def _run(tmp_path, *args, missing="", tests_rc=0, bench_rc=0, cwd=None, **env_overrides):
    """Run a copy of the script in tmp_path/repo; returns (result, state folder)."""
    repo, state, bin_dir = tmp_path / "repo", tmp_path / "state", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts")
    shutil.copytree(ROOT / "benchmarks", repo / "benchmarks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    state.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               REAL_PYTHON=sys.executable, PYTHONPATH=str(ROOT), STUB_STATE=str(state),
               STUB_MISSING=missing, STUB_TESTS_RC=str(tests_rc), STUB_BENCH_RC=str(bench_rc))
    for name in ("WHEELS", "VERIFY_BUDGET_S", "PYTHON", "PIP_CONSTRAINT"):
        env.pop(name, None)
    env.update(env_overrides)
    result = subprocess.run(["bash", str(repo / "scripts" / "verify_on_gpu.sh"), *args],
                            env=env, capture_output=True, text=True, timeout=60, cwd=cwd)
    return result, state


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_script_is_valid_bash_and_executable():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & 0o111


def test_script_speaks_to_its_users_only():
    text = SCRIPT.read_text()
    for word in (".gpu", "shared", "device", "session"):
        assert word not in text.lower(), word
    for path in ("tests/test_gpu.py", "benchmarks/moe_layer_benchmark.py", "docker/Dockerfile",
                 "docs/docker.md", "docs/benchmark.md"):
        assert path in text and (ROOT / path).exists(), path


def test_runs_the_gpu_tests_then_the_benchmark_over_every_path_and_prints_the_table(tmp_path):
    result, state = _run(tmp_path, STUB_BENCH_JSON=BENCH_JSON)
    assert result.returncode == 0, result
    pytest_args = _read(state / "pytest.args")
    assert pytest_args.startswith("-m pytest") and "-m gpu" in pytest_args
    assert pytest_args.split()[-1] == "tests/test_gpu.py"
    bench_args = _read(state / "bench.args").split()
    assert bench_args[:3] == ["benchmarks/moe_layer_benchmark.py", "--preset", "h100"]
    assert "--paths" not in bench_args and "--max-seconds" not in bench_args  # all; no budget
    assert bench_args[bench_args.index("--output") + 1] == str(tmp_path / "out/benchmark.json")
    assert not (state / "pip.log").exists()  # nothing installed
    # The table last: after the tests' lines, in summary.txt, with the exit statuses.
    out = result.stdout
    assert out.index("1 passed") < out.index("exit status 0; benchmark exit status 0")
    assert out.index("exit status 0; benchmark exit status 0") < out.index("stand-in row")
    assert "stand-in row" in out.splitlines()[-2] and out.splitlines()[-1].startswith("passed")
    summary = _read(tmp_path / "out" / "summary.txt")
    assert "upstream K4 rho=1" in summary and "preset=h100" in summary
    assert (tmp_path / "out" / "environment.txt").exists()


@pytest.mark.parametrize("tests_rc, bench_rc", [(0, 0), (1, 0), (0, 1), (0, 124)])
def test_exit_status_says_whether_tests_and_benchmark_passed(tmp_path, tests_rc, bench_rc):
    result, _ = _run(tmp_path, tests_rc=tests_rc, bench_rc=bench_rc)
    assert result.returncode == (0 if (tests_rc, bench_rc) == (0, 0) else 1), result
    assert "no benchmark JSON" in result.stdout  # the summary is printed all the same
    assert f"exit status {tests_rc}; benchmark exit status {bench_rc}" in result.stdout
    assert ("FAILED" in result.stdout) == ((tests_rc, bench_rc) != (0, 0))


MISSING_LINES = {
    "torch": r"missing: torch: install a CUDA build of PyTorch, or use NVIDIA's PyTorch container",
    "cuda": r"missing: CUDA visible to torch .* --gpus all",
    "megatron.core": r"missing: megatron\.core \(megatron-core 0\.19\.x\): pip install --no-deps "
                r"megatron-core==0\.19\.2, or, without network, --wheels DIR",
    "transformer_engine.pytorch": r"missing: transformer_engine .*docker/Dockerfile.* pip install "
                          r"--no-build-isolation 'transformer_engine\[pytorch\]'",
    "pytest": r"missing: pytest: pip install pytest, or, without network, --wheels DIR",
}


@pytest.mark.parametrize("name", sorted(MISSING_LINES))
def test_each_missing_prerequisite_is_one_line_and_nothing_runs(tmp_path, name):
    result, state = _run(tmp_path, missing=name)
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.startswith("missing:")]
    assert len(lines) == 1 and re.fullmatch(MISSING_LINES[name] + ".*", lines[0]), lines
    assert not (state / "pytest.args").exists() and not (state / "bench.args").exists()


def test_all_missing_prerequisites_are_named_at_once(tmp_path):
    result, _ = _run(tmp_path, missing="cuda megatron.core transformer_engine.pytorch pytest")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("missing:")]
    assert len(lines) == 4
    assert "4 prerequisite(s) missing: nothing was run" in result.stderr


def test_megatron_core_of_another_minor_version_is_named(tmp_path):
    result, _ = _run(tmp_path, STUB_CORE_VERSION="0.18.0")
    assert result.returncode == 2
    assert "missing: megatron-core 0.19.x (found 0.18.0)" in result.stderr


@pytest.mark.parametrize("missing, megatron_core", [
    ("megatron.core pytest", "megatron-core==0.19.2"),
    ("megatron.core numpy pytest", "megatron-core==0.19.2 numpy")])
def test_wheels_install_only_what_is_missing_without_an_index(tmp_path, missing, megatron_core):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result, state = _run(tmp_path, missing=missing, WHEELS=str(wheels))
    assert result.returncode == 0, result
    assert _read(state / "pip.log").splitlines() == [
        f"install --no-index --find-links {wheels} --no-deps {megatron_core}",
        f"install --no-index --find-links {wheels} pytest",
    ]
    assert (state / "bench.args").exists()


def test_relative_folders_are_the_callers(tmp_path):
    (tmp_path / "wheels").mkdir()
    result, state = _run(tmp_path, "--wheels", "wheels", missing="pytest", cwd=tmp_path,
                         OUT="results")
    assert result.returncode == 0, result
    assert f"--find-links {tmp_path / 'wheels'} pytest" in _read(state / "pip.log")
    assert (tmp_path / "results" / "summary.txt").exists()


def test_wheels_option_installs_nothing_when_everything_imports(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result, state = _run(tmp_path, "--wheels", str(wheels))
    assert result.returncode == 0, result
    assert not (state / "pip.log").exists()


def test_a_missing_wheel_folder_is_said(tmp_path):
    result, state = _run(tmp_path, "--wheels", str(tmp_path / "nowhere"), missing="pytest")
    assert result.returncode == 2
    assert "missing: the wheel folder" in result.stderr and "--download-wheels" in result.stderr
    assert not (state / "pip.log").exists()


def test_download_wheels_for_the_gpu_machine(tmp_path):
    wheels = tmp_path / "wheels"
    result, state = _run(tmp_path, "--download-wheels", str(wheels), "--python-version", "3.12",
                         "--platform", "manylinux_2_28_x86_64")
    assert result.returncode == 0, result
    target = "--python-version 3.12 --platform manylinux_2_28_x86_64"
    assert _read(state / "pip.log").splitlines() == [
        f"download --only-binary=:all: --no-deps -d {wheels} {target} "
        "megatron-core==0.19.2 numpy packaging",
        f"download --only-binary=:all: -d {wheels} {target} pytest",
    ]
    assert wheels.is_dir() and f"--wheels {wheels}" in result.stdout
    assert not (state / "pytest.args").exists() and not (state / "bench.args").exists()


def test_download_without_target_options_is_for_this_python(tmp_path):
    result, state = _run(tmp_path, "--download-wheels", str(tmp_path / "w"))
    assert result.returncode == 0, result
    assert "--platform" not in _read(state / "pip.log")


@pytest.mark.parametrize("args", [["--python-version", "3.12"], ["--bogus"], ["--wheels"]])
def test_usage_errors(tmp_path, args):
    result, state = _run(tmp_path, *args)
    assert result.returncode == 2 and result.stderr
    assert not (state / "pytest.args").exists()


def test_budget_limits_the_benchmark_and_other_options_reach_it(tmp_path):
    result, state = _run(tmp_path, "--", "--warmup", "3", "--repeats", "10",
                         VERIFY_BUDGET_S="600")
    assert result.returncode == 0, result
    bench_args = _read(state / "bench.args")
    seconds = int(re.search(r"--max-seconds (\d+)", bench_args).group(1))
    assert 500 <= seconds <= 540
    assert bench_args.endswith("--warmup 3 --repeats 10\n")
    text = SCRIPT.read_text()  # and the benchmark is killed at the budget
    assert "limit=(timeout --kill-after=5" in text
    assert '${limit[@]+"${limit[@]}"} "$python" benchmarks/moe_layer_benchmark.py' in text


def test_a_budget_that_is_not_a_number_is_refused(tmp_path):
    result, _ = _run(tmp_path, VERIFY_BUDGET_S="7m")
    assert result.returncode == 2 and "VERIFY_BUDGET_S" in result.stderr


def test_benchmark_docs_speak_to_users_only():
    text = (ROOT / "docs" / "benchmark.md").read_text()
    for phrase in ("session", "device call", "device time", "device tool", ".gpu/", "shared/",
                   "(issue", "/tmp/site"):
        assert phrase not in text.lower(), phrase
    assert "bash scripts/verify_on_gpu.sh" in text and "--download-wheels" in text
