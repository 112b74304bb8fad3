"""The main job: napari with the plugin's docks and a sample slide, tissue detected and tiled.

With ``headless=OUT`` it runs the same steps, writes the results (tissue mask, patch grid,
a preview of both and a screenshot of the window) to OUT, and exits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _wait(widget, worker, timeout: float = 120.0) -> None:
    """Process Qt events until a worker started by ``widget`` has delivered its result."""
    from qtpy.QtWidgets import QApplication

    if worker is None:
        raise RuntimeError(f"the step did not start: {widget.status.value}")
    start = time.perf_counter()
    while widget.is_running(worker):
        QApplication.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - start > timeout:
            raise TimeoutError("worker did not finish in time")
    QApplication.processEvents()


def run_demo(headless: str | Path | None = None, slide: str = "synthetic") -> dict:
    import warnings

    # napari's notice about PyQt5's deprecation would cover the demo's canvas; PyQt6 is tested too
    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend is deprecated")
    import napari
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    viewer = napari.Viewer(title="napari-mil demo", show=True)
    viewer.window.resize(1600, 1000)
    _, widget = viewer.window.add_plugin_dock_widget("napari-mil", "Slide & tissue")
    if slide == "cmu1":
        viewer.open_sample("napari-mil", "cmu1_small_region")
    elif slide == "synthetic":
        viewer.open_sample("napari-mil", "synthetic_slide")
    else:
        viewer.open(slide, plugin="napari-mil")
    t_open = time.perf_counter() - t0
    _wait(widget, widget.detect())
    _wait(widget, widget.tile())
    viewer.reset_view()
    timings = {"open_s": round(t_open, 2), "total_s": round(time.perf_counter() - t0, 2)}
    if headless is None:
        napari.run()
        return timings

    from napari_mil.tiling import render_grid_preview

    out = Path(headless)
    out.mkdir(parents=True, exist_ok=True)
    state = widget.state
    name = state.slide.name
    state.tissue_mask.save(out / f"{name}_tissue_mask.png")
    state.grid.save(out / f"{name}_patches.h5")
    Image.fromarray(render_grid_preview(state.slide, state.tissue_mask, state.grid)).save(out / f"{name}_grid.png")
    shot = viewer.screenshot(canvas_only=False, flash=False)
    Image.fromarray(np.asarray(shot)).save(out / "screenshot.png")
    summary = {
        "slide": str(state.slide.path), "patches": len(state.grid),
        "tissue_fraction": round(state.tissue_mask.tissue_area_fraction, 4), **timings,
        "files": sorted(p.name for p in out.iterdir()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    viewer.close()
    return summary
