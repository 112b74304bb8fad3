"""Regenerate the user guide's screenshots from the teaching demo (no hand-made pictures).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/screenshots.py

Runs the demo headless (the same steps as ``bash scripts/demo.sh``) and copies its pictures
into docs/images/.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from napari_mil._napari._demo import run_demo

IMAGES = Path(__file__).resolve().parent / "images"
PICTURES = {"first_picture.png": "01_slide_tissue_patches.png", "retrain_curves.png": "02_retrain_curves.png",
            "screenshot.png": "03_teacher_student_window.png", "teacher_student.png": "04_teacher_student_canvas.png"}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_demo(headless=tmp)
        IMAGES.mkdir(exist_ok=True)
        for source, target in PICTURES.items():
            shutil.copy(Path(tmp) / source, IMAGES / target)
    print(f"wrote {len(PICTURES)} screenshots to {IMAGES} (demo took {summary['timings_s']['total_s']} s)", file=sys.stderr)
