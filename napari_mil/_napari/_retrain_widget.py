"""The Retrain dock: train a MIL model, plainly or with MHIM-MIL, on a cohort CSV, as
``napari-mil train`` does, with live curves, cancel and checkpoints.

It runs the same cross-validation (``usecases.cross_validation``): the CSV's own split when it
has one, else the same patient-level folds for the same seed, each fold trained with early
stopping and its test slides predicted; predictions.csv and summary.json go beside the
checkpoints. Every setting it does not show is ``TrainConfig``'s default, and so are the epochs
and learning rate it starts with. In MHIM-MIL mode with the teacher from a baseline (the
default, the authors' recipe), each fold trains a plain baseline first, for up to as many epochs
again: its curves are series of their own.

The dock writes the viewer's state only: the open slide's teacher | student maps after every
epoch (the Compare dock shows them), and at the end the model to view, with its teacher and
MHIM-MIL settings: the model of the fold that held the open slide out, else fold 0's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

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

from napari_mil._napari._model_widget import model_choices
from napari_mil._napari._state import MapPair, TrainingSetup
from napari_mil._napari._training_run import (
    CohortUpdate,
    EpochUpdate,
    FoldDoneUpdate,
    FoldsUpdate,
    TrainingJob,
    TrainingOutcome,
    WarningsUpdate,
    run_training,
)
from napari_mil._napari._workers import DockBase, set_progress, spare_pool_threads
from napari_mil.errors import NapariMilError

if TYPE_CHECKING:
    import napari

MHIM_FIELDS = ("mask_ratio", "mask_ratio_l", "mask_ratio_h", "mask_ratio_hr", "mm", "mm_final", "alpha", "temp_t", "temp_s")
MHIM_LABELS = {"mask_ratio": "Random mask ratio", "mask_ratio_l": "Low mask ratio", "mask_ratio_h": "High share (h)",
               "mask_ratio_hr": "Masked of high (hr)", "mm": "EMA momentum", "mm_final": "Final momentum",
               "alpha": "Consistency weight", "temp_t": "Teacher temperature", "temp_s": "Student temperature"}
DEFAULT_FOLDS = 5  # as napari-mil train --folds


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
        self.model_name = ComboBox(label="Model", choices=model_choices(), value="abmil")
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
        self.seed = SpinBox(label="Seed", value=0, min=0, max=10_000, tooltip="of the folds and of training")
        self.k = SpinBox(label="Folds", value=DEFAULT_FOLDS, min=2, max=50,
                         tooltip="patient-level cross-validation folds when the CSV has no split column")
        self.checkpoint_dir = FileEdit(label="Output folder", mode="d", value=str(default_feature_root().parent / "models"),
                                       tooltip="each fold's checkpoint, predictions.csv and summary.json")
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.epoch_label = Label(value="")
        self.epoch_label.native.setWordWrap(True)
        self.curves = Container(labels=False)
        self.extend([self.cohort, self.features_root, self.model_name, *self.transmil_fields.values(),
                     self.use_mhim, self.teacher, self.preset,
                     *self.mhim_fields.values(), self.mrh_schedule, self.mm_schedule, self.epochs, self.lr, self.seed,
                     self.k, self.checkpoint_dir, self.train_button, self.cancel_button, self.progress,
                     self.epoch_label, self.curves, self.status])
        self._make_plots()
        self.status.value = "Choose a cohort CSV (File > Open Sample > napari-mil > teaching demo writes one)."
        self.preset.changed.connect(self.apply_preset)
        self.model_name.changed.connect(self._show_model_options)
        self.use_mhim.changed.connect(self._show_mhim_options)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.result = None  # the last run's CrossValidationResult
        self.viewed = None  # the FoldResult whose model went to the viewer
        self._base_config = None  # a setup's TrainConfig: what the form does not show comes from it
        self._job: TrainingJob | None = None  # the run under way (or the last one)
        self._folds: FoldsUpdate | None = None
        self._fold_shown = -1  # the fold whose curves are drawn
        self._warned: list[str] = []  # warnings of the run under way already shown
        self._first_warnings: list[str] = []  # those said before training
        self.apply_preset(self.preset.value)
        self._show_model_options()
        self._show_mhim_options()
        self.native.setMaximumWidth(460)
        self.listen(self.state.events.training, self._on_setup)
        if self.state.training is not None:
            self._on_setup(self.state.training)

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
        self._show_mhim(cfg)
        self.model_name.value = "transmil" if name.endswith("transmil") else (
            self.model_name.value if self.model_name.value != "transmil" else "abmil")

    def _show_mhim(self, cfg) -> None:
        for field, box in self.mhim_fields.items():
            box.value = getattr(cfg, field)
        self.mrh_schedule.value, self.mm_schedule.value = cfg.mrh_schedule, cfg.mm_schedule

    def _show_mhim_options(self, *_) -> None:
        for box in (self.teacher, self.preset, *self.mhim_fields.values(), self.mrh_schedule, self.mm_schedule):
            box.enabled = self.use_mhim.value

    def _show_model_options(self, *_) -> None:
        for box in self.transmil_fields.values():
            box.visible = self.model_name.value == "transmil"

    def _on_setup(self, setup: TrainingSetup | None) -> None:
        """Take on a training setup from the state: the cohort, the output folder and the configuration."""
        if setup is None:
            return
        cfg = setup.config
        self.cohort.value, self.checkpoint_dir.value = str(setup.cohort), str(setup.checkpoint_dir)
        self.model_name.value = cfg.model
        for name, box in self.transmil_fields.items():
            if name in cfg.model_cfg:
                box.value = cfg.model_cfg[name]
        self.use_mhim.value = cfg.mhim is not None
        if cfg.mhim is not None:
            self.preset.value = "custom"
            self._show_mhim(cfg.mhim)
        self.teacher.value, self.epochs.value, self.lr.value, self.seed.value = cfg.teacher, cfg.epochs, cfg.lr, cfg.seed
        if setup.folds is not None:
            self.k.value = setup.folds
        self._base_config = cfg

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
        given = self._base_config.mhim if self._base_config is not None else None
        base = PRESETS.get(self.preset.value) or given or MHIMConfig()
        values = {field: float(box.value) for field, box in self.mhim_fields.items()}
        return replace(base, **values, mrh_schedule=self.mrh_schedule.value, mm_schedule=self.mm_schedule.value)

    def train_config(self):
        """The dock's fields as a TrainConfig; what the dock does not show stays TrainConfig's
        default (early stopping, normalisation...), as for ``napari-mil train``, or the setup's."""
        from napari_mil.training.trainer import TrainConfig

        return replace(self._base_config or TrainConfig(), model=self.model_name.value, model_cfg=self.model_cfg(),
                       epochs=int(self.epochs.value), lr=float(self.lr.value), seed=int(self.seed.value),
                       mhim=self.mhim_config(), teacher=self.teacher.value)

    @staticmethod
    def _has_baseline_phase(cfg) -> bool:
        return cfg.mhim is not None and cfg.teacher == "baseline" and not cfg.teacher_init

    def _phases(self) -> int:
        return 2 if self._has_baseline_phase(self._job.config) else 1

    # ---- training ------------------------------------------------------------------------------
    def train(self):
        """Prepare the cohort's features, then cross-validate in a worker; curves and maps update live.
        Everything the run uses is read from the form now: changing it meanwhile changes nothing."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.cohort import read_cohort

        try:
            if not str(self.cohort.value) or Path(self.cohort.value) == Path("."):
                raise NapariMilError("choose a cohort CSV first (slide_id, label, path[, patient_id, split])")
            slides = read_cohort(self.cohort.value)
            slide = self.state.slide
            job = TrainingJob(slides, self.train_config(), int(self.k.value), Path(self.features_root.value),
                              Path(self.checkpoint_dir.value), self._encoder_name(), self.state.features,
                              slide.path if slide is not None else None)
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        self._job, self._folds, self._fold_shown, self._warned, self._first_warnings = job, None, -1, [], []
        self._cancel.clear()
        for plot in (self.loss_plot, self.auc_plot, self.mask_plot):
            plot.clear()
        self.progress.max, self.progress.value = len(slides) + 1, 0  # the epochs come once the folds are made
        self.epoch_label.value = ""
        self.train_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"preparing the features of {len(slides)} slides..."
        worker = create_worker(self._run, job, _ignore_errors=True)
        return self._start(worker, self._done, on_update=self._on_update, on_finished=self._idle)

    def _encoder_name(self) -> str:
        from napari_mil.encoders import DEFAULT_ENCODER

        return self.state.encoder or DEFAULT_ENCODER

    def _run(self, job: TrainingJob):
        """Generator run by the worker: the typed updates of ``run_training``, then its outcome."""
        return (yield from self._reports(lambda report: run_training(job, report, self._cancel.is_set)))

    def _on_update(self, update) -> None:
        job = self._job
        if isinstance(update, CohortUpdate):
            p = update.progress
            set_progress(self.progress, p.done)
            self.status.value = f"features {p.done}/{p.total}: {p.slide_id} ({'extracted' if p.extracted else 'cached'})"
        elif isinstance(update, FoldsUpdate):
            self._folds = update
            self.progress.max = len(job.slides) + update.n_folds * self._phases() * job.config.epochs
        elif isinstance(update, WarningsUpdate):
            self._first_warnings = update.messages
            first = ("training a baseline first (the teacher's start), then the MHIM-MIL student"
                     if self._has_baseline_phase(job.config) else "training")
            self._warn(update.messages, f"{first}, {self._fold_words()}...")
        elif isinstance(update, EpochUpdate):
            self._show_epoch(update)
        elif isinstance(update, FoldDoneUpdate):
            self._warn(update.result.warnings, self.status.value)

    def _fold_words(self, fold: int | None = None) -> str:
        folds = self._folds
        if folds is None or folds.single_split:
            return "the CSV's split"
        return f"{folds.n_folds} folds" if fold is None else f"fold {fold + 1}/{folds.n_folds}"

    def _show_epoch(self, update: EpochUpdate) -> None:
        job, report = self._job, update.report
        cfg, baseline = job.config, update.report.phase == "baseline"
        if update.fold != self._fold_shown:  # the curves show one fold at a time
            self._fold_shown = update.fold
            for plot, title in ((self.loss_plot, "loss"), (self.auc_plot, "validation AUC"),
                                (self.mask_plot, "share masked")):
                plot.clear()
                plot.title = f"{title}, {self._fold_words(update.fold)}"
        # the bar: the slides' features, the folds done, the baseline's epochs (all of them, however
        # early it stopped, once the MHIM-MIL phase runs), then this phase's
        phases = self._phases()
        done = (len(job.slides) + update.fold * phases * cfg.epochs
                + (cfg.epochs if phases == 2 and not baseline else 0) + report.epoch)
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
        self.epoch_label.value = (f"{phase} epoch {report.epoch}/{cfg.epochs} of {self._fold_words(update.fold)}: "
                                  f"loss {report.train_loss:.3f}, val loss {report.val_loss:.3f}, "
                                  f"val AUC {report.val_auc:.3f}{masked}, {report.seconds:.1f} s").lstrip()
        # the open slide's maps, while it is still the one open; every epoch: no notification each time
        if update.maps is not None and self.state.features is job.open_bag:
            self.state.pair = MapPair(*update.maps, announce=False)

    def _warn(self, warnings_: list[str], status: str) -> None:
        """Show the warnings not shown yet in this run as napari warnings; the status line gets
        ``status`` followed by every warning given."""
        from napari.utils.notifications import show_warning

        for message in warnings_:
            if message not in self._warned:
                self._warned.append(message)
                show_warning(message)
        self.status.value = status + "".join(f"\nwarning: {w}" for w in warnings_ if f"warning: {w}" not in status)

    def _idle(self) -> None:
        self.train_button.enabled, self.cancel_button.enabled = True, False

    def _done(self, outcome: TrainingOutcome) -> None:
        cv, viewed = outcome.cv, outcome.viewed
        self.result, self.viewed = cv, viewed
        set_progress(self.progress, self.progress.max)
        self.state.set_model(outcome.model, outcome.meta, outcome.teacher, self._job.config.mhim)  # as trained
        summary = f"{self._trained_words(outcome)}; {self._figures(cv)}; checkpoint {viewed.result.checkpoint}"
        warnings_ = [*self._first_warnings, *(w for f in cv.folds for w in f.warnings), *cv.summary.get("warnings", [])]
        self._say(summary)
        if warnings_:  # e.g. that a model did not learn: its maps mean little
            self._warn(warnings_, summary)

    def _trained_words(self, outcome: TrainingOutcome) -> str:
        """What the viewed model's training was, and why it is the one viewed."""
        result, fold, cv = outcome.viewed.result, outcome.viewed.fold, outcome.cv
        trained = f"{len(result.history)} epochs, the best {result.best_epoch}"
        if result.baseline is not None:
            trained = f"a baseline ({len(result.baseline.history)} epochs), then the MHIM-MIL student ({trained})"
        where = "on the CSV's split" if cv.single_split else f"in fold {fold + 1} of {len(cv.folds)}"
        role = outcome.open_role
        if role is None:
            why = "the open slide is not in the cohort" if self.state.slide is not None else "no slide is open"
        elif role == "test":
            why = "it held the open slide out: an out-of-fold view"
        else:
            why = f"the open slide was in its {'training' if role == 'train' else 'validation'} set: not a held-out view"
        return f"trained {trained} {where}, the model viewed ({why})"

    @staticmethod
    def _figures(cv) -> str:
        """Validation and test figures: per-fold validation AUCs and the pooled out-of-fold test AUC
        with its CI, or the split's, or that there is no test set."""
        import numpy as np

        val = [f.result.val_metrics.get("auc", float("nan")) for f in cv.folds]
        words = (f"validation AUC {val[0]:.3f}" if cv.single_split
                 else f"validation AUC {np.nanmean(val):.3f} (mean of {len(val)} folds)")
        if not cv.rows:
            return f"{words}; no test set (the CSV's split has no test slides): no held-out figure"
        lo, hi = cv.summary["pooled_test_auc_95ci"]
        what = "test AUC" if cv.single_split else "pooled out-of-fold test AUC"
        return (f"{words}; {what} {cv.summary['pooled_test_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}) "
                f"over {cv.summary['n_test_slides']} slides")

    def cancel(self) -> None:
        """Stop at the next bag; the best checkpoint so far is kept."""
        self._cancel.set()
        self.status.value = "cancelling..."
