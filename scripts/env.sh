# Sourced by the other scripts: create .venv if needed, activate it, install lily and what it needs; every
# command after it runs the venv's "$VENV/bin/python", whatever else is on PATH.
# torch==2.13.0 is installed first and on its own: on a CPU-only machine it is the CPU build from local
# disk, so nothing below it pulls a multi-GB CUDA torch. Set LILY_VENV to use another location.
VENV="${LILY_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -c "import torch" 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
