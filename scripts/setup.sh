#!/usr/bin/env bash
# Make .venv with Python >= 3.12 (setup.cfg's python_requires; CI uses 3.12) and install the
# plugin with the exact versions CI uses. Looked for, in order: python3.12, python3.13,
# python3.14, python3, then pyenv's versions (3.12 first).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

supported() {
    "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in python3.12 python3.13 python3.14 python3; do
        if command -v "$candidate" >/dev/null && supported "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    local pyenv_root
    pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    for candidate in $(ls -d "$pyenv_root"/versions/3.*/bin/python3 2>/dev/null | sort -V); do
        if supported "$candidate"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! python=$(find_python); then
        echo "ERROR: Python >= 3.12 not found (tried python3.12, python3.13, python3.14," \
             "python3 and pyenv's versions)." >&2
        echo "megatron-core 0.19 needs Python >= 3.12; install it (e.g. 'pyenv install 3.12')." >&2
        exit 1
    fi
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -c constraints-ci.txt -e '.[test]'
echo "setup: $(.venv/bin/python -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)')"
