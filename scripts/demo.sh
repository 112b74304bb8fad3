#!/usr/bin/env bash
# The main job: napari with the napari-mil docks and a synthetic slide, tissue detected and
# tiled. Without a display it runs headless under Xvfb and writes the mask, the grid, a preview
# and a screenshot to demo_output/ (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
VENV=${NAPARI_MIL_VENV:-.venv}
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ -z "${NAPARI_MIL_HEADLESS:-}" ]; then
  exec "$VENV/bin/napari-mil" demo "$@"
fi
out=${1:-demo_output}
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$VENV/bin/napari-mil" demo --headless "$out"
