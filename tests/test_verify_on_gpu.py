"""scripts/verify_on_gpu.sh: valid shell, runs what exists, brings back what the device allows."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "verify_on_gpu.sh"


def test_script_is_valid_bash_and_executable():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert SCRIPT.stat().st_mode & 0o111


def test_script_runs_the_gpu_tests_and_the_benchmark_over_every_path():
    text = SCRIPT.read_text()
    for path in ("tests/test_gpu.py", "benchmarks/moe_layer_benchmark.py"):
        assert path in text and (ROOT / path).exists(), path
    assert "bash .gpu/p5/install.sh" in text  # shared/gpu/install.sh, staged by prepare.sh
    assert "--preset h100" in text and "--paths" not in text  # every path, every precision


def test_script_writes_at_most_eight_files_one_folder_deep():
    """The device tool brings back at most 8 files from $OUT."""
    files = set(re.findall(r'"\$out/([A-Za-z0-9_.-]+)"', SCRIPT.read_text()))
    files |= set(re.findall(r"\{out\}/([A-Za-z0-9_.-]+)", SCRIPT.read_text()))
    assert {"benchmark.json", "gpu_tests.log", "summary.txt"} <= files and len(files) <= 8


def test_budget_leaves_margin_in_a_device_call_and_the_benchmark_is_time_limited():
    """The last device call gets VERIFY_BUDGET_S plus start-up margin of the session's 15
    minutes, which the machine's start and five staging calls share."""
    text = SCRIPT.read_text()
    assert "VERIFY_BUDGET_S:-420" in text
    assert re.search(r"timeout --kill-after=5 .*\n\s+python3 benchmarks/moe_layer_benchmark.py",
                     text)


STUB = """#!/usr/bin/env bash
# python3 stand-in: pytest importable or not, tests and benchmark exit with the given status.
case "$*" in
  *"import pytest"*) exit $STUB_PYTEST_MISSING ;;
  "-m pytest"*) echo "1 passed"; exit $STUB_TESTS_RC ;;
  benchmarks/*) exit $STUB_BENCH_RC ;;
  "- "*) exec "$REAL_PYTHON" "$@" ;;
  *) exit 0 ;;
esac
"""


def _run_script(tmp_path, pytest_missing=0, tests_rc=0, bench_rc=0):
    import os
    import shutil
    import sys

    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, tmp_path / "scripts")
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").write_text(STUB)
    (tmp_path / "bin" / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
               OUT=str(tmp_path / "out"), REAL_PYTHON=sys.executable,
               PYTHONPATH=str(ROOT), STUB_PYTEST_MISSING=str(pytest_missing),
               STUB_TESTS_RC=str(tests_rc), STUB_BENCH_RC=str(bench_rc))
    return subprocess.run(["bash", str(tmp_path / "scripts" / "verify_on_gpu.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_exit_status_says_whether_tests_and_benchmark_passed(tmp_path):
    for case, (tests_rc, bench_rc) in enumerate(((0, 0), (1, 0), (0, 124))):
        result = _run_script(tmp_path / str(case), tests_rc=tests_rc, bench_rc=bench_rc)
        assert result.returncode == (0 if (tests_rc, bench_rc) == (0, 0) else 1), result
        assert "no benchmark JSON" in result.stdout  # the summary still printed
        assert f"exit status {tests_rc}; benchmark exit status {bench_rc}" in result.stdout


def test_missing_pytest_is_said_and_fails(tmp_path):
    result = _run_script(tmp_path, pytest_missing=1)
    assert result.returncode == 1
    assert "pytest is not importable" in result.stdout and "--stage-pytest" in result.stdout
    assert "NOT run" in (tmp_path / "out" / "gpu_tests.log").read_text()
