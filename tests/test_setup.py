"""scripts/setup.sh finds a Python that setup.cfg's python_requires admits, and only such."""

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"


def _find_python(tmp_path: Path, pythons: dict) -> subprocess.CompletedProcess:
    """setup.sh's find_python with only ``pythons`` ({command name: real interpreter}) on PATH
    and no pyenv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, interpreter in pythons.items():
        (bin_dir / name).symlink_to(interpreter)
    for tool in ("bash", "ls", "sort"):  # what the functions call besides the pythons
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    functions = re.search(r"^supported\(\).*?^}\n\nfind_python\(\).*?^}\n", SETUP.read_text(),
                          re.MULTILINE | re.DOTALL)[0]
    environment = {"PATH": str(bin_dir), "PYENV_ROOT": str(tmp_path / "no-pyenv"),
                   "HOME": str(tmp_path)}
    return subprocess.run(["bash", "-c", f"{functions}\nfind_python"], capture_output=True,
                          text=True, env=environment, timeout=60)


def test_setup_script_and_setup_cfg_state_one_python_rule():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["options"]["python_requires"] == ">=3.12"
    assert "sys.version_info[:2] < (3, 12)" in SETUP.read_text()


def test_setup_script_takes_any_supported_python(tmp_path):
    # This interpreter (3.12 or newer, as the suite's own) under another name.
    found = _find_python(tmp_path, {"python3": sys.executable})
    assert found.returncode == 0 and found.stdout.strip() == str(tmp_path / "bin" / "python3")


def test_setup_script_refuses_an_older_python(tmp_path):
    old = tmp_path / "python3.11"
    old.write_text("#!/bin/sh\nexit 1\n")  # what an older Python's version check does
    old.chmod(0o755)
    found = _find_python(tmp_path, {"python3": str(old)})
    assert found.returncode == 1 and found.stdout == ""
