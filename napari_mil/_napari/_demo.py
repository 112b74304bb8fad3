"""The teaching demo, the README's main job: MHIM-MIL's teacher and masked student, live.

It opens a held-out semi-real slide (``napari_mil.synthetic.semireal``: real H&E texture of the CMU-1
slide, a nuclear-atypia lesion whose extent is known, stain variation and mimics), detects
tissue, tiles it and extracts its features, while a small labelled semi-real cohort is
generated (cached after the first run). It then puts its training setup (the cohort with one
train/val/test split, the recipe) in the viewer's state, which the Retrain dock's form takes on,
and presses Train: an MHIM-MIL ABMIL (a plain baseline first, the teacher starts from it), with
live curves, while the Compare dock shows the ground-truth lesion, the teacher and the student
side by side, refreshed after every epoch of the MHIM-MIL phase. At the end it gives the
held-out slide's probability and how well each attention map finds the lesion (localisation
AUC). With ``slide="cmu1"`` the real CMU-1 slide (no label, no ground truth) takes the held-out
slide's place: the same flow, with inference and maps only.

Every step is a dock action in a thread worker, chained on the GUI thread, so the viewer stays
responsive. With ``headless=OUT`` it runs the same steps, writes screenshots, the exports and
``summary.json`` (timings, validation and test AUC, the held-out slide's figures) to OUT, and exits.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from napari_mil.atomic import write_json

# Semi-real slides (napari_mil.synthetic.semireal) at 0.5 µm/px, 256 px patches at 20x. The cohort: 24
# slides of 5120x3840 (bags of about 50-110 patches), half with a lesion on 5-30% of the tissue,
# a little easier than the default difficulty (0.5) so that a couple of minutes of CPU teach
# the models where the lesions are on every cohort seed tried.
DEMO_COHORT = {"n_slides": 24, "seed": 5, "width": 5120, "height": 3840, "difficulty": 0.4,
               "burden_range": (0.05, 0.3)}
# The held-out slide: a lesion on 12% of its tissue (about 17 of its ~170 patches).
DEMO_SLIDE = {"width": 7168, "height": 5632, "seed": 4242, "lesion_burden": 0.12, "difficulty": 0.4,
              "tissue_pieces": 2}
# The official recipes are tuned for bags of thousands of patches: their 1-3% random-high share
# masks nothing in the demo's bags of 50-110 (hard-instance mining needs 1 / (h x hr) patches,
# 200 for camelyon16_abmil). The demo's recipe keeps their shape (random-high with a cosine
# decay, low and random masks, a light consistency term) with shares that show each kind in
# bags this small. The momentum is the official 0.9999: the teacher starts from the trained
# baseline (the Retrain dock's default) and should stay close to it; an untrained teacher
# (teacher "fresh") would need a faster one (0.99) to follow the student in the demo's few
# hundred steps.
DEMO_RECIPE = {"mask_ratio": 0.3, "mask_ratio_l": 0.1, "mask_ratio_h": 0.1, "mask_ratio_hr": 0.5, "alpha": 0.1,
               "mm": 0.9999, "mrh_schedule": True, "mm_schedule": False}
# Epochs per phase (baseline, then MHIM-MIL); the learning rate and the rest are the Retrain
# dock's, which are TrainConfig's defaults.
DEMO_EPOCHS = 15
LESION_COVER = 0.5  # a patch counts as lesion when the ground truth covers at least half of it


def demo_train_config(epochs: int = DEMO_EPOCHS):
    """The demo's training: MHIM-MIL ABMIL with ``DEMO_RECIPE``; the rest TrainConfig's defaults."""
    from napari_mil.training.mhim import MHIMConfig
    from napari_mil.training.trainer import TrainConfig

    return TrainConfig(epochs=epochs, mhim=MHIMConfig(**DEMO_RECIPE))


def demo_folder() -> Path:
    from napari_mil.paths import cache_dir

    key = hashlib.sha1(json.dumps(["semireal", DEMO_COHORT, DEMO_SLIDE]).encode()).hexdigest()[:10]
    return cache_dir() / f"teaching_demo_{key}"


def demo_slide_path() -> Path:
    """The held-out slide with its ground-truth lesion, written once."""
    from napari_mil.synthetic.semireal import make_semireal_slide

    path = demo_folder() / "held_out" / "held_out_slide.tif"
    if not path.with_suffix(".json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        make_semireal_slide(path, **DEMO_SLIDE)
    return path


def demo_cohort() -> Path:
    """The labelled training cohort, written once: labels.csv with slide paths, and beside it
    labels_split.csv, the same with the split the demo trains (see ``split_cohort``).

    It is written in a separate process: it runs beside the viewer's own slide reading on
    another core, and its JPEG encoder never shares a process with OpenSlide's decoder (with
    both in one process, reads of the open slide stalled while the cohort was written). It
    renders with one thread fewer than the machine has cores, leaving one to the viewer."""
    import multiprocessing
    import os

    from napari_mil.synthetic.semireal import make_semireal_cohort

    folder = demo_folder() / "cohort"
    csv_path = folder / "labels.csv"
    if not csv_path.exists():
        workers = min(4, max(1, (os.cpu_count() or 2) - 1))
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            pool.apply(make_semireal_cohort, (folder,), {**DEMO_COHORT, "workers": workers})
    return split_cohort(csv_path)


def split_cohort(csv_path: Path, k: int = 5, seed: int = 0) -> Path:
    """``labels_split.csv`` beside ``csv_path``: its rows with a split column, the first of the
    ``k`` patient-level folds ``napari-mil train`` makes with ``seed`` (train, val and test). The
    Retrain dock trains a CSV's own split once, where it would train all ``k`` folds of a CSV
    without one: the demo trains one model, and still reports a held-out test AUC."""
    import csv

    from napari_mil.atomic import write_csv
    from napari_mil.training.data import label_columns, patient_folds, read_labels

    records = read_labels(csv_path)
    fold = patient_folds(records, k, seed)[0]  # folds by patient and label: records serve as bags
    split_of = {records[i].slide_id: name for name, index in fold.items() for i in index}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        column = label_columns(reader.fieldnames or [], csv_path.name)["slide_id"]
        rows = [{**row, "split": split_of[row[column].strip()]} for row in reader]
    return write_csv(csv_path.with_name("labels_split.csv"), rows)


def slide_figures(state, threshold: float | None = None) -> dict:
    """The open slide's figures for the trained teacher and student: the probability of the
    positive class and, when the slide has a ground-truth lesion, the localisation AUC of each
    model's attention over the whole bag (unmasked) against the patches at least half lesion."""
    import numpy as np

    from napari_mil._napari._compare_layers import ground_truth
    from napari_mil.tiling import tissue_fractions
    from napari_mil.tissue import TissueMask
    from napari_mil.training.metrics import roc_auc
    from napari_mil.usecases.prediction import model_map

    bag = state.features
    if bag is None or state.model is None:
        return {}
    size0 = bag.geometry.patch_size_level0
    lesion = None
    truth = ground_truth(state.slide) if state.slide is not None else None  # None: CMU-1, the user's slides
    if truth is not None:
        mask, downsample = truth
        lesion = tissue_fractions(TissueMask(mask, (downsample,) * 2), np.asarray(bag.coords), size0) >= LESION_COVER
    figures: dict = {"patches": int(len(bag.coords))}
    if lesion is not None:
        figures["lesion_patches"] = int(lesion.sum())
    for name, model in (("teacher", state.teacher), ("student", state.model)):
        if model is None:
            continue
        attention, probs = model_map(model, bag, name)
        entry = {"probability": round(float(probs[-1]), 3)}
        if threshold is not None:
            entry["positive"] = bool(probs[-1] >= threshold)
        if lesion is not None and lesion.any() and not lesion.all():
            entry["localisation_auc"] = round(float(roc_auc(lesion, attention.values)), 3)
        figures[name] = entry
    return figures


class TeachingDemo:
    """The demo's steps, each started when the previous one's worker has finished."""

    def __init__(self, viewer, slide: str = "synthetic", epochs: int = DEMO_EPOCHS, snapshots: Path | None = None):
        from napari_mil._napari._workers import spare_pool_threads

        self.viewer, self.slide, self.epochs, self.snapshots = viewer, slide, epochs, snapshots
        spare_pool_threads()  # the demo runs workers of several docks at once
        self.docks = {name: viewer.window.add_plugin_dock_widget("napari-mil", name, tabify=True)[1]
                      for name in ("Slide & tissue", "Features", "Model", "Compare teacher | student", "Retrain")}
        self.t0 = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.cohort_csv: Path | None = None
        self.train_config = demo_train_config(epochs)
        self.figures: dict = {}  # the held-out slide's figures at the end
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
        from concurrent.futures import ThreadPoolExecutor

        from qtpy.QtCore import QTimer

        # The cohort is awaited in a thread of its own, not in a napari worker, which would hold
        # a thread of Qt's global pool for as long as it takes (see spare_pool_threads).
        executor = ThreadPoolExecutor(1, thread_name_prefix="napari-mil-demo-cohort")
        self._cohort_future = executor.submit(demo_cohort)
        executor.shutdown(wait=False)
        self._cohort_timer = QTimer()
        self._cohort_timer.setInterval(100)
        self._cohort_timer.timeout.connect(self._poll_cohort)
        self._cohort_timer.start()
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

    def _poll_cohort(self) -> None:
        future = self._cohort_future
        if not future.done():
            return
        self._cohort_timer.stop()
        if future.exception() is not None:
            self.fail(f"cohort: {future.exception()}")
        else:
            self._cohort_ready(future.result())

    def _cohort_ready(self, csv_path) -> None:
        self.mark("cohort_ready_s")
        self.cohort_csv = csv_path
        self._train_when_ready()

    def _train_when_ready(self) -> None:
        from napari_mil._napari._state import TrainingSetup

        if not (self.features_ready and self.cohort_csv) or self.done:
            return
        retrain = self.docks["Retrain"]
        retrain.state.training = TrainingSetup(self.cohort_csv, demo_folder() / "models", self.train_config)
        retrain.native.parent().raise_()  # bring its tab (the live curves) to the front
        self._then(retrain, retrain.train(), self._trained)

    def _trained(self) -> None:
        """The Compare dock computes the trained teacher and student's pair on its own (it listens to
        the state): wait for it."""
        self.mark("trained_s")
        compare = self.docks["Compare teacher | student"]
        compare.native.parent().raise_()
        self._when_idle(compare, self._finish)

    def _when_idle(self, dock, step) -> None:
        """Run ``step`` once ``dock`` has no worker running and no GUI steps left."""
        from qtpy.QtCore import QTimer

        if self.done:
            return
        if dock.busy:
            QTimer.singleShot(50, lambda: self._when_idle(dock, step))
        else:
            step()

    def _finish(self) -> None:
        from napari.utils.notifications import show_info

        self.mark("total_s")
        self.viewer.reset_view()
        retrain = self.docks["Retrain"]
        meta = retrain.state.model_meta
        try:
            self.figures = slide_figures(retrain.state, meta.get("threshold") if meta else None)
        except Exception as exc:  # noqa: BLE001  the figures are a summary: never stop the demo for them
            self.figures = {"error": str(exc)}
        words = [f"{name} p={f['probability']:.2f}" + (f", lesion localisation AUC {f['localisation_auc']:.2f}"
                                                       if "localisation_auc" in f else "")
                 for name, f in self.figures.items() if isinstance(f, dict) and "probability" in f]
        if words:
            slide = retrain.state.slide
            show_info(f"{slide.name if slide is not None else 'the slide'}: " + "; ".join(words))
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
        retrain = self.docks["Retrain"]
        retrain.native.grab().save(str(out / "retrain_curves.png"))
        state = retrain.state
        if state.pair is not None and state.slide is not None:  # the pair the Compare dock shows
            from napari_mil.exports import export_pair

            maps = {"teacher": state.pair.teacher, "student": state.pair.student}
            for fmt in ("GeoJSON", "CSV", "PNG"):
                export_pair(out / "exports", fmt, state.slide, maps)
        cv = retrain.result
        result = retrain.viewed.result if retrain.viewed is not None else None
        cfg = self.train_config
        test_auc = cv.summary.get("pooled_test_auc") if cv is not None else None
        summary = {
            "slide": str(state.slide.path) if state.slide else None,
            "patches": len(state.features) if state.features is not None else 0,
            "cohort": str(self.cohort_csv), "recipe": DEMO_RECIPE, "epochs": self.epochs,
            "lr": cfg.lr, "teacher": cfg.teacher,
            "best_epoch": result.best_epoch if result else None,
            "validation_auc": round(float(result.val_metrics["auc"]), 3) if result else None,
            "baseline_validation_auc": round(float(result.baseline.val_metrics["auc"]), 3)
            if result and result.baseline else None,
            "test_auc": round(float(test_auc), 3) if test_auc is not None else None,
            "test_auc_95ci": [round(float(v), 3) for v in cv.summary["pooled_test_auc_95ci"]]
            if test_auc is not None else None,
            "warnings": [*(result.baseline.warnings if result and result.baseline else []),
                         *(result.warnings if result else [])],
            "held_out": self.figures,
            "history": [{"phase": r.phase, "epoch": r.epoch, "train_loss": round(r.train_loss, 4),
                         "val_loss": round(r.val_loss, 4), "val_auc": round(r.val_auc, 3), "masked": round(r.mask_ratio, 3)}
                        for r in ([*result.baseline.history, *result.history] if result and result.baseline
                                  else result.history if result else [])],
            "timings_s": self.timings, "error": self.error,
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        }
        write_json(out / "summary.json", summary)
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
