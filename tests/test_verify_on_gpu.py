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
