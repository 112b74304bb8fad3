#!/usr/bin/env bash
# Installs what the tests need (see setup_env.sh) and runs the whole suite except GPU tests.
# The GUI tests drive a real napari viewer on a virtual X server started by pytest-xvfb.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not gui"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
VENV=${NAPARI_MIL_VENV:-.venv}
export NAPARI_MIL_CACHE=${NAPARI_MIL_CACHE:-$PWD/.venv/cache}
exec "$VENV/bin/python" -m pytest "$@"
