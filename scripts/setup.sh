#!/usr/bin/env bash
# Make .venv with Python 3.12 and install the plugin with the exact versions CI uses.
# Python 3.12 is looked for as plain `python3.12` first, then in pyenv's versions.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

find_python312() {
    if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
        command -v python3.12
        return 0
    fi
    local pyenv_root
    pyenv_root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    local candidate
    for candidate in $(ls -d "$pyenv_root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r); do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if [ ! -x .venv/bin/python ]; then
    if ! python=$(find_python312); then
        echo "ERROR: Python 3.12 not found (tried 'python3.12' and pyenv's versions/3.12.*)." >&2
        echo "megatron-core 0.19 needs Python >= 3.12; install it (e.g. 'pyenv install 3.12')." >&2
        exit 1
    fi
    echo "setup: creating .venv with $python"
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check \
    -c constraints-ci.txt -e '.[test]'
echo "setup: $(.venv/bin/python -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)')"
