#!/usr/bin/env bash
# The main job, the teaching demo: napari opens a held-out semi-real slide (real H&E texture, a
# nuclear-atypia lesion with ground truth), trains MHIM-MIL on a small semi-real cohort with live
# curves (a baseline first, the teacher from it), and shows the ground truth, the teacher and
# the masked student side by side. Without a display it runs headless
# under Xvfb and writes screenshots, exports and summary.json to demo_output/ (or the folder
# given as the first argument).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
VENV=${NAPARI_MIL_VENV:-.venv}
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ -z "${NAPARI_MIL_HEADLESS:-}" ]; then
  exec "$VENV/bin/napari-mil" demo "$@"
fi
out=${1:-demo_output}
exec xvfb-run -a -s "-screen 0 1600x1000x24" "$VENV/bin/napari-mil" demo --headless "$out"
