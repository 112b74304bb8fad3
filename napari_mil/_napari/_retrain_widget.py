"""The Retrain dock: train a MIL model, plainly or with MHIM-MIL, on a cohort CSV, with live
curves, cancel and checkpoints; the teacher | student maps of the open slide refresh after
every epoch, so the user watches them diverge.

It trains as ``napari-mil train`` does: every setting it does not show (early stopping, the
minimum number of epochs, feature normalisation, the schedule) is ``TrainConfig``'s default,
and so are the epochs and learning rate it starts with. In MHIM-MIL mode with the teacher
from a baseline (the default, the authors' recipe), a plain baseline trains first, for up to
as many epochs again: its curves are drawn as series of their own, and the teacher | student
maps appear once the MHIM-MIL phase starts (the baseline has no teacher)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)

from napari_mil._napari._model_widget import MODEL_CHOICES
from napari_mil._napari._widgets import DockBase, set_progress
from napari_mil.errors import NapariMilError

if TYPE_CHECKING:
    import napari

MHIM_FIELDS = ("mask_ratio", "mask_ratio_l", "mask_ratio_h", "mask_ratio_hr", "mm", "mm_final", "alpha", "temp_t", "temp_s")
MHIM_LABELS = {"mask_ratio": "Random mask ratio", "mask_ratio_l": "Low mask ratio", "mask_ratio_h": "High share (h)",
               "mask_ratio_hr": "Masked of high (hr)", "mm": "EMA momentum", "mm_final": "Final momentum",
               "alpha": "Consistency weight", "temp_t": "Teacher temperature", "temp_s": "Student temperature"}


def spare_pool_threads(at_least: int = 8) -> None:
    """Give Qt's global thread pool spare threads.

    napari's thread workers run on it, and it has as many threads as there are cores. Qt also
    converts the window's image for the screen on it (a repaint of a window holding an OpenGL
    canvas), while the GUI thread waits holding the GIL: when every pool thread was in a worker
    that needed the GIL, the viewer froze for good. Seen on 2 cores with two workers at once
    (the end of a training and the Compare dock's comparison it starts; the teaching demo's
    cohort and tissue detection). Idle threads cost nothing."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    pool.setMaxThreadCount(max(pool.maxThreadCount(), at_least))


@contextlib.contextmanager
def leaving_a_core():
    """Torch's intra-op threads limited to the cores less one while the block runs, then restored.

    Training a MIL model steps one bag at a time: small operations, where all-core thread pools
    gain little and lose much when another thread wants a core. In the viewer, the GUI thread
    (and its software OpenGL) does: on two cores, epochs of the teaching demo took 0.5-3 s with
    two torch threads against ~0.05 s with one, measured with another process busy on one core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 2) - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainingUpdate:
    """What the training worker yields to the GUI thread."""

    kind: str  # "cohort" (features ready for a slide), "warnings" (before training), "epoch" (report, maps)
    payload: Any


class RetrainWidget(DockBase):
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from napari_mil.paths import default_feature_root

        spare_pool_threads()  # its worker, then the Compare dock's, with the GUI drawing meanwhile
        from napari_mil.training.mhim import PRESETS, MHIMConfig
        from napari_mil.training.model_options import TRANSMIL_DEFAULTS
        from napari_mil.training.trainer import TrainConfig

        self.cohort = FileEdit(label="Cohort CSV", mode="r", filter="*.csv",
                               tooltip="slide_id, label, path[, patient_id, split]")
        self.features_root = FileEdit(label="Feature folder", mode="d", value=str(default_feature_root()))
        self.model_name = ComboBox(label="Model", choices=MODEL_CHOICES[:4], value="abmil")
        # TransMIL's size (TrainConfig.model_cfg), shown only when TransMIL is chosen
        self.transmil_fields = {
            "dim": SpinBox(label="TransMIL width", value=TRANSMIL_DEFAULTS["dim"], min=8, max=8192, step=8,
                           tooltip="embedding width; a multiple of the heads"),
            "heads": SpinBox(label="TransMIL heads", value=TRANSMIL_DEFAULTS["heads"], min=1, max=64),
            "landmarks": SpinBox(label="TransMIL landmarks", value=TRANSMIL_DEFAULTS["landmarks"], min=1, max=65536,
                                 tooltip="Nyström landmarks (more: closer to exact attention, slower)"),
        }
        self.use_mhim = CheckBox(text="MHIM-MIL (teacher and masked student)", value=True)
        train_defaults = TrainConfig()
        self.teacher = ComboBox(label="Teacher starts from", choices=["baseline", "fresh"], value=train_defaults.teacher,
                                tooltip="baseline: a plain model trained first (the authors' recipe; training takes up "
                                        "to twice the epochs); fresh: the student's random initialisation")
        self.preset = ComboBox(label="Official recipe", choices=["custom", *PRESETS], value="camelyon16_abmil")
        defaults = MHIMConfig()
        self.mhim_fields = {name: FloatSpinBox(label=MHIM_LABELS[name], value=getattr(defaults, name), min=0.0,
                                               max=1.0 if name not in ("temp_t", "temp_s", "alpha") else 10.0,
                                               step=0.0001 if name.startswith("mm") else 0.01)
                            for name in MHIM_FIELDS}
        self.mrh_schedule = CheckBox(text="cosine decay of h", value=False)
        self.mm_schedule = CheckBox(text="cosine momentum schedule", value=False)
        self.epochs = SpinBox(label="Epochs", value=train_defaults.epochs, min=1, max=1000,
                              tooltip=f"at most, per phase: training stops when the validation loss has not improved "
                                      f"for {train_defaults.patience} epochs (never before epoch "
                                      f"{train_defaults.min_epochs})")
        self.lr = FloatSpinBox(label="Learning rate", value=train_defaults.lr, min=1e-6, max=1.0, step=1e-5,
                               tooltip=f"Adam's, with a {train_defaults.schedule} schedule")
        self.seed = SpinBox(label="Seed", value=0, min=0, max=10_000)
        self.checkpoint_dir = FileEdit(label="Checkpoint folder", mode="d", value=str(default_feature_root().parent / "models"))
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.epoch_label = Label(value="")
        self.epoch_label.native.setWordWrap(True)
        self.curves = Container(labels=False)
        self.extend([self.cohort, self.features_root, self.model_name, *self.transmil_fields.values(),
                     self.use_mhim, self.teacher, self.preset,
                     *self.mhim_fields.values(), self.mrh_schedule, self.mm_schedule, self.epochs, self.lr, self.seed,
                     self.checkpoint_dir, self.train_button, self.cancel_button, self.progress, self.epoch_label,
                     self.curves, self.status])
        self._make_plots()
        self.status.value = "Choose a cohort CSV (File > Open Sample > napari-mil > teaching demo writes one)."
        self.preset.changed.connect(self.apply_preset)
        self.model_name.changed.connect(self._show_model_options)
        self.use_mhim.changed.connect(self._show_mhim_options)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.result = None
        self._training_cfg = None  # the configuration of the run under way (or last run)
        self._n_slides = 0  # the run's slides: the progress bar's first steps
        self._warned: list[str] = []  # warnings of the run under way already shown
        self.apply_preset(self.preset.value)
        self._show_model_options()
        self._show_mhim_options()
        self.native.setMaximumWidth(460)

    def _make_plots(self) -> None:
        from napari_mil._napari._plot import CurvePlot

        self.loss_plot = CurvePlot("loss")
        self.auc_plot = CurvePlot("validation AUC", y_range=(0.0, 1.0))
        self.mask_plot = CurvePlot("share masked", y_range=(0.0, 1.0))
        for plot in (self.loss_plot, self.auc_plot, self.mask_plot):
            self.curves.native.layout().addWidget(plot)

    # ---- settings ---------------------------------------------------------------------------
    def apply_preset(self, name: str) -> None:
        """Fill the MHIM-MIL fields with an official recipe (and pick the model it is for)."""
        from napari_mil.training.mhim import PRESETS

        if name not in PRESETS:
            return
        cfg = PRESETS[name]
        for field, box in self.mhim_fields.items():
            box.value = getattr(cfg, field)
        self.mrh_schedule.value, self.mm_schedule.value = cfg.mrh_schedule, cfg.mm_schedule
        self.model_name.value = "transmil" if name.endswith("transmil") else (
            self.model_name.value if self.model_name.value != "transmil" else "abmil")

    def _show_mhim_options(self, *_) -> None:
        for box in (self.teacher, self.preset, *self.mhim_fields.values(), self.mrh_schedule, self.mm_schedule):
            box.enabled = self.use_mhim.value

    def _show_model_options(self, *_) -> None:
        for box in self.transmil_fields.values():
            box.visible = self.model_name.value == "transmil"

    def model_cfg(self) -> dict:
        """TrainConfig.model_cfg from the model's fields (TransMIL's size), checked."""
        from napari_mil.training.model_options import transmil_options

        if self.model_name.value != "transmil":
            return {}
        return transmil_options(**{name: int(box.value) for name, box in self.transmil_fields.items()})

    def mhim_config(self):
        from napari_mil.training.mhim import PRESETS, MHIMConfig

        if not self.use_mhim.value:
            return None
        base = PRESETS.get(self.preset.value, MHIMConfig())
        values = {field: float(box.value) for field, box in self.mhim_fields.items()}
        from dataclasses import replace

        return replace(base, **values, mrh_schedule=self.mrh_schedule.value, mm_schedule=self.mm_schedule.value)

    def train_config(self):
        """The dock's fields as a TrainConfig; what the dock does not show stays TrainConfig's
        default (early stopping, normalisation...), as for ``napari-mil train``."""
        from napari_mil.training.trainer import TrainConfig

        return TrainConfig(model=self.model_name.value, model_cfg=self.model_cfg(), epochs=int(self.epochs.value),
                           lr=float(self.lr.value), seed=int(self.seed.value), mhim=self.mhim_config(),
                           teacher=self.teacher.value)

    @staticmethod
    def _has_baseline_phase(cfg) -> bool:
        return cfg.mhim is not None and cfg.teacher == "baseline" and not cfg.teacher_init

    # ---- training ------------------------------------------------------------------------------
    def train(self):
        """Prepare the cohort's features, then train in a worker; curves and maps update live."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.cohort import read_cohort

        try:
            if not str(self.cohort.value) or Path(self.cohort.value) == Path("."):
                raise NapariMilError("choose a cohort CSV first (slide_id, label, path[, patient_id, split])")
            slides = read_cohort(self.cohort.value)
            cfg = self._training_cfg = self.train_config()
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self._cancel.clear()
        for plot in (self.loss_plot, self.auc_plot, self.mask_plot):
            plot.clear()
        self._n_slides, self._warned = len(slides), []
        phases = 2 if self._has_baseline_phase(cfg) else 1
        self.progress.max, self.progress.value = len(slides) + phases * cfg.epochs, 0
        self.epoch_label.value = ""
        self.train_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"preparing the features of {len(slides)} slides..."
        worker = create_worker(self._run, slides, cfg, Path(self.features_root.value), Path(self.checkpoint_dir.value),
                               self._encoder_name(), _ignore_errors=True)
        return self._start(worker, self._done, on_update=self._on_update, on_finished=self._idle)

    def _encoder_name(self) -> str:
        from napari_mil.encoders import DEFAULT_ENCODER

        return self.state.encoder or DEFAULT_ENCODER

    def _run(self, slides, cfg, feature_root, checkpoint_dir, encoder_name):
        """Generator run by the worker: cohort progress, epochs and maps as TrainingUpdates."""
        from napari_mil.encoders import create_encoder
        from napari_mil.usecases.cohort import ensure_features
        from napari_mil.training.data import patient_folds
        from napari_mil.training.trainer import mhim_bag_size_warnings, train

        open_bag = self.state.features  # the open slide's features, for the live maps

        @leaving_a_core()
        def run(report):
            encoder = create_encoder(encoder_name, device="auto")
            bags = ensure_features(slides, encoder, feature_root, progress=lambda p: report(TrainingUpdate("cohort", p)),
                                   cancel=self._cancel.is_set)
            if all(s.record.split for s in slides):
                pick = {name: [b for b, s in zip(bags, slides) if s.record.split == name] for name in ("train", "val")}
            else:
                fold = patient_folds(bags, k=5, seed=cfg.seed)[0]
                pick = {name: [bags[i] for i in fold[name]] for name in ("train", "val")}
            report(TrainingUpdate("warnings", mhim_bag_size_warnings(cfg.mhim, pick["train"]) if cfg.mhim else []))
            holder: dict = {}

            def on_epoch(epoch_report):
                report(TrainingUpdate("epoch", (epoch_report, self._maps_now(holder, open_bag, cfg))))

            return train(pick["train"], pick["val"], cfg, checkpoint=checkpoint_dir / f"{cfg.model}_retrained",
                         on_epoch=on_epoch, cancel=self._cancel.is_set, extra_meta={"encoder": encoder_name},
                         on_start=lambda model, mhim: holder.update(model=model, mhim=mhim))

        return (yield from self._reports(run))

    @staticmethod
    def _maps_now(holder: dict, bag, cfg):
        """The open slide's teacher | student maps between two epochs (in the training thread)."""
        from napari_mil.usecases.prediction import teacher_student_maps

        model, mhim = holder.get("model"), holder.get("mhim")
        if bag is None or model is None or mhim is None:
            return None
        was_training = model.training
        try:
            return teacher_student_maps(mhim.teacher, model, bag, cfg.mhim, mhim.current_ratio_h(), 0)
        finally:
            model.train(was_training)

    def _on_update(self, update: TrainingUpdate) -> None:
        if update.kind == "cohort":
            p = update.payload
            set_progress(self.progress, p.done)
            self.status.value = f"features {p.done}/{p.total}: {p.slide_id} ({'extracted' if p.extracted else 'cached'})"
            return
        cfg = self._training_cfg
        if update.kind == "warnings":
            first = ("training a baseline first (the teacher's start), then the MHIM-MIL student"
                     if self._has_baseline_phase(cfg) else "training")
            self._warn(update.payload, f"{first}...")
            return
        report, maps = update.payload
        baseline = report.phase == "baseline"
        # the bar: the slides' features, the baseline's epochs (all of them, however early it
        # stopped, once the MHIM-MIL phase runs), then this phase's
        done = self._n_slides + (cfg.epochs if self._has_baseline_phase(cfg) and not baseline else 0) + report.epoch
        set_progress(self.progress, min(self.progress.max, done))
        # the baseline's curves are series of their own, over the same epochs as the student's
        # ("base": its training loss; names short enough for the legend to fit the dock)
        self.loss_plot.add("base" if baseline else "train", report.epoch, report.train_loss)
        self.loss_plot.add("base val" if baseline else "val", report.epoch, report.val_loss)
        self.auc_plot.add("baseline" if baseline else "val", report.epoch, report.val_auc)
        if not baseline:  # the baseline masks nothing
            self.mask_plot.add("masked", report.epoch, report.mask_ratio)
        phase = "baseline" if baseline else ("MHIM-MIL" if cfg.mhim is not None else "")
        masked = "" if baseline or cfg.mhim is None else f", {report.mask_ratio:.0%} masked"
        self.epoch_label.value = (f"{phase} epoch {report.epoch}/{cfg.epochs}: loss {report.train_loss:.3f}, "
                                  f"val loss {report.val_loss:.3f}, val AUC {report.val_auc:.3f}{masked}, "
                                  f"{report.seconds:.1f} s").lstrip()
        if maps is not None:
            self._show_maps(maps)

    def _warn(self, warnings_: list[str], status: str) -> None:
        """Show the warnings not shown yet in this run as napari warnings; the status line gets
        ``status`` followed by every warning given."""
        from napari.utils.notifications import show_warning

        for message in warnings_:
            if message not in self._warned:
                self._warned.append(message)
                show_warning(message)
        self.status.value = status + "".join(f"\nwarning: {w}" for w in warnings_)

    def _show_maps(self, maps) -> None:
        compare = self._compare_dock()
        if compare is not None and self.state.slide is not None:
            compare.show_pair(maps, announce=False)  # every epoch: no notification each time

    def _compare_dock(self):
        """The Compare dock of this viewer, opened if needed."""
        from napari_mil._napari._compare_widget import CompareWidget
        from napari_mil._napari._state import find_dock

        dock = find_dock(self.viewer, CompareWidget)
        if dock is None:
            dock = self.viewer.window.add_plugin_dock_widget("napari-mil", "Compare teacher | student")[1]
        return dock

    def _idle(self) -> None:
        self.train_button.enabled, self.cancel_button.enabled = True, False

    def _done(self, result) -> None:
        from napari_mil.training.checkpoints import load_checkpoint, load_teacher

        self.result = result
        state = self.state
        _, meta = load_checkpoint(result.checkpoint)
        state.model, state.model_meta = result.model.cpu().eval(), meta
        state.teacher = load_teacher(result.checkpoint, meta)  # the best epoch's, as the student
        state.mhim = self._training_cfg.mhim  # as trained, whatever the fields say now
        set_progress(self.progress, self.progress.max)
        auc = result.val_metrics.get("auc", float("nan"))
        trained = f"{len(result.history)} epochs, the best {result.best_epoch}"
        if result.baseline is not None:
            trained = (f"a baseline ({len(result.baseline.history)} epochs), then the MHIM-MIL student "
                       f"({trained})")
        summary = (f"trained {trained}; validation AUC {auc:.3f}, threshold {result.threshold:.2f}; "
                   f"checkpoint {result.checkpoint}")
        warnings_ = [*(result.baseline.warnings if result.baseline is not None else []), *result.warnings]
        self._say(summary)
        if warnings_:  # e.g. that the model did not learn: its maps mean little
            self._warn(warnings_, summary)
        if state.teacher is not None and state.features is not None and state.slide is not None:
            compare = self._compare_dock()
            if compare is not None:
                compare.compare()

    def cancel(self) -> None:
        """Stop at the next bag; the best checkpoint so far is kept."""
        self._cancel.set()
        self.status.value = "cancelling..."
