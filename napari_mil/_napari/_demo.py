"""The teaching demo, the README's main job: MHIM-MIL's teacher and masked student, live.

It opens a held-out synthetic slide with tumour ground truth, detects tissue, tiles it and
extracts its features, while a small labelled synthetic cohort is generated (cached after the
first run). It then trains an MHIM-MIL ABMIL on the cohort in the Retrain dock, with live
curves, and shows the ground truth, the teacher and the student side by side, refreshed after
every epoch. With ``slide="cmu1"`` the real CMU-1 slide (no label, no ground truth) takes the
held-out slide's place: the same flow, with inference and maps only.

Every step is a dock action in a thread worker, chained on the GUI thread, so the viewer stays
responsive. With ``headless=OUT`` it runs the same steps, writes screenshots, the exports and
``summary.json`` (timings, validation AUC) to OUT, and exits.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

DEMO_COHORT = {"n_slides": 16, "seed": 11, "width": 2560, "height": 1920, "mpp": 0.5, "burden_range": (0.05, 0.4)}
DEMO_SLIDE = {"width": 6144, "height": 4608, "mpp": 0.5, "seed": 4242, "tumour_burden": 0.12, "tissue_pieces": 2}
# The official recipes are tuned for bags of thousands of patches and a teacher initialised
# from a trained baseline: 1-3% random-high masking masks nothing in the demo's bags of 30-150,
# and momentum 0.9999 would leave an untrained teacher where it started over the demo's ~200
# steps. Its recipe keeps their shape (random-high with a cosine decay, low and random masks, a
# light consistency term) with shares that show each kind, and a momentum the teacher can follow.
DEMO_RECIPE = {"mask_ratio": 0.3, "mask_ratio_l": 0.1, "mask_ratio_h": 0.1, "mask_ratio_hr": 0.5, "alpha": 0.1,
               "mm": 0.99, "mrh_schedule": True, "mm_schedule": False}
DEMO_EPOCHS = 15
DEMO_LR = 1e-3


def demo_folder() -> Path:
    from napari_mil._napari._sample_data import cache_dir

    key = hashlib.sha1(json.dumps([DEMO_COHORT, DEMO_SLIDE]).encode()).hexdigest()[:10]
    return cache_dir() / f"teaching_demo_{key}"


def demo_slide_path() -> Path:
    """The held-out slide with ground truth, written once."""
    from napari_mil.synthetic import make_synthetic_slide

    path = demo_folder() / "held_out" / "held_out_slide.tif"
    if not path.with_suffix(".json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_synthetic_slide(path, **DEMO_SLIDE)
    return path


def demo_cohort() -> Path:
    """The labelled training cohort (labels.csv with slide paths), written once.

    It is written in a separate process: it runs beside the viewer's own slide reading on
    another core, and its JPEG encoder never shares a process with OpenSlide's decoder (with
    both in one process, reads of the open slide stalled while the cohort was written)."""
    import multiprocessing

    from napari_mil.synthetic import make_cohort

    folder = demo_folder() / "cohort"
    csv_path = folder / "labels.csv"
    if not csv_path.exists():
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(make_cohort, (folder,), DEMO_COHORT)
    return csv_path


class TeachingDemo:
    """The demo's steps, each started when the previous one's worker has finished."""

    def __init__(self, viewer, slide: str = "synthetic", epochs: int = DEMO_EPOCHS, snapshots: Path | None = None):
        self.viewer, self.slide, self.epochs, self.snapshots = viewer, slide, epochs, snapshots
        self.docks = {name: viewer.window.add_plugin_dock_widget("napari-mil", name, tabify=True)[1]
                      for name in ("Slide & tissue", "Features", "Model", "Compare teacher | student", "Retrain")}
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.cohort_csv: Path | None = None
        self.features_ready = False
        self.done = False
        self.error: str | None = None

    def mark(self, name: str) -> None:
        self.timings[name] = round(time.perf_counter() - self.t0, 2)

    def _then(self, dock, worker, step) -> None:
        """Run ``step`` after ``worker`` has delivered its result to ``dock`` (stop on an error)."""
        if worker is None:
            self.fail(dock.status.value)
            return
        dock.after(worker, lambda error: self.fail(str(error)) if error is not None else step())

    def fail(self, message: str) -> None:
        self.error, self.done = message or "a step did not start", True

    # ---- the steps -------------------------------------------------------------------------
    def start(self) -> None:
        from napari.qt.threading import create_worker

        cohort = create_worker(demo_cohort, _ignore_errors=True)
        cohort.returned.connect(self._cohort_ready)
        cohort.errored.connect(lambda exc: self.fail(f"cohort: {exc}"))
        self._cohort_worker = cohort
        cohort.start()
        if self.slide == "cmu1":
            self.viewer.open_sample("napari-mil", "cmu1_small_region")
        else:
            self.viewer.open(demo_slide_path(), plugin="napari-mil")
        self.viewer.reset_view()
        self.mark("slide_shown_s")
        dock = self.docks["Slide & tissue"]
        self._then(dock, dock.detect(), self._tile)

    def _tile(self) -> None:
        dock = self.docks["Slide & tissue"]
        self._then(dock, dock.tile(), self._extract)

    def _extract(self) -> None:
        self.mark("tiled_s")
        self.viewer.reset_view()
        if self.snapshots is not None:  # the first picture: slide, tissue and patches
            import numpy as np
            from PIL import Image

            self.snapshots.mkdir(parents=True, exist_ok=True)
            shot = self.viewer.screenshot(canvas_only=False, flash=False)
            Image.fromarray(np.asarray(shot)).save(self.snapshots / "first_picture.png")
        dock = self.docks["Features"]
        self._then(dock, dock.extract(), self._features_done)

    def _features_done(self) -> None:
        self.mark("features_s")
        self.features_ready = True
        self._train_when_ready()

    def _cohort_ready(self, csv_path) -> None:
        self.mark("cohort_ready_s")
        self.cohort_csv = csv_path
        self._train_when_ready()

    def _train_when_ready(self) -> None:
        if not (self.features_ready and self.cohort_csv) or self.done:
            return
        retrain = self.docks["Retrain"]
        retrain.cohort.value = str(self.cohort_csv)
        retrain.checkpoint_dir.value = str(demo_folder() / "models")
        retrain.preset.value = "custom"
        for field, value in DEMO_RECIPE.items():
            box = retrain.mhim_fields.get(field) or getattr(retrain, field)
            box.value = value
        retrain.epochs.value, retrain.lr.value = self.epochs, DEMO_LR
        retrain.native.parent().raise_()  # bring its tab (the live curves) to the front
        self._then(retrain, retrain.train(), self._trained)

    def _trained(self) -> None:
        self.mark("trained_s")
        compare = self.docks["Compare teacher | student"]
        compare.native.parent().raise_()
        worker = compare.compare()
        self._then(compare, worker, self._finish)

    def _finish(self) -> None:
        self.mark("total_s")
        self.viewer.reset_view()
        self.done = True

    # ---- headless output ----------------------------------------------------------------------
    def write(self, out: Path) -> dict:
        import numpy as np
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        shot = self.viewer.screenshot(canvas_only=False, flash=False)
        Image.fromarray(np.asarray(shot)).save(out / "screenshot.png")
        canvas = self.viewer.screenshot(canvas_only=True, flash=False)
        Image.fromarray(np.asarray(canvas)).save(out / "teacher_student.png")
        compare, retrain = self.docks["Compare teacher | student"], self.docks["Retrain"]
        retrain.native.grab().save(str(out / "retrain_curves.png"))
        compare.export_folder.value = str(out / "exports")
        for fmt in ("GeoJSON", "CSV", "PNG"):
            compare.export(fmt)
        result = retrain.result
        summary = {
            "slide": str(compare.state.slide.path) if compare.state.slide else None,
            "patches": len(compare.state.features) if compare.state.features is not None else 0,
            "cohort": str(self.cohort_csv), "recipe": DEMO_RECIPE, "epochs": self.epochs, "lr": DEMO_LR,
            "best_epoch": result.best_epoch if result else None,
            "validation_auc": round(float(result.val_metrics["auc"]), 3) if result else None,
            "history": [{"epoch": r.epoch, "train_loss": round(r.train_loss, 4), "val_loss": round(r.val_loss, 4),
                         "val_auc": round(r.val_auc, 3), "masked": round(r.mask_ratio, 3)} for r in (result.history if result else [])],
            "timings_s": self.timings, "error": self.error,
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def run_demo(headless: str | Path | None = None, slide: str = "synthetic", epochs: int = DEMO_EPOCHS,
             timeout: float = 600.0) -> dict:
    import warnings

    # napari's notice about PyQt5's deprecation would cover the demo's canvas; PyQt6 is tested too
    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend is deprecated")
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="napari-mil teaching demo", show=True)
    viewer.window.resize(1600, 1000)
    demo = TeachingDemo(viewer, slide, epochs, Path(headless) if headless is not None else None)
    demo.start()
    if headless is None:
        napari.run()
        return demo.timings
    start = time.perf_counter()
    while not demo.done:
        QApplication.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - start > timeout:
            demo.fail(f"the demo did not finish within {timeout:.0f} s")
    QApplication.processEvents()
    summary = demo.write(Path(headless))
    viewer.close()
    if demo.error:
        raise RuntimeError(f"teaching demo failed: {demo.error}")
    return summary
