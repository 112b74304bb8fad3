"""The Retrain dock: train a MIL model, plainly or with MHIM-MIL, on a cohort CSV, with live
curves, cancel and checkpoints; the teacher | student maps of the open slide refresh after
every epoch, so the user watches them diverge."""

from __future__ import annotations

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


@dataclass
class TrainingUpdate:
    """What the training worker yields to the GUI thread."""

    kind: str  # "cohort" (features ready for a slide), "epoch", "maps"
    payload: Any


class RetrainWidget(DockBase):
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        from napari_mil._napari._features_widget import default_feature_root
        from napari_mil.training.mhim import PRESETS, MHIMConfig
        from napari_mil.training.model_options import TRANSMIL_DEFAULTS

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
        self.preset = ComboBox(label="Official recipe", choices=["custom", *PRESETS], value="camelyon16_abmil")
        defaults = MHIMConfig()
        self.mhim_fields = {name: FloatSpinBox(label=MHIM_LABELS[name], value=getattr(defaults, name), min=0.0,
                                               max=1.0 if name not in ("temp_t", "temp_s", "alpha") else 10.0,
                                               step=0.0001 if name.startswith("mm") else 0.01)
                            for name in MHIM_FIELDS}
        self.mrh_schedule = CheckBox(text="cosine decay of h", value=False)
        self.mm_schedule = CheckBox(text="cosine momentum schedule", value=False)
        self.epochs = SpinBox(label="Epochs", value=20, min=1, max=1000)
        self.lr = FloatSpinBox(label="Learning rate", value=2e-4, min=1e-6, max=1.0, step=1e-5)
        self.seed = SpinBox(label="Seed", value=0, min=0, max=10_000)
        self.checkpoint_dir = FileEdit(label="Checkpoint folder", mode="d", value=str(default_feature_root().parent / "models"))
        self.train_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.epoch_label = Label(value="")
        self.curves = Container(labels=False)
        self.extend([self.cohort, self.features_root, self.model_name, *self.transmil_fields.values(),
                     self.use_mhim, self.preset,
                     *self.mhim_fields.values(), self.mrh_schedule, self.mm_schedule, self.epochs, self.lr, self.seed,
                     self.checkpoint_dir, self.train_button, self.cancel_button, self.progress, self.epoch_label,
                     self.curves, self.status])
        self._make_plots()
        self.status.value = "Choose a cohort CSV (File > Open Sample > napari-mil > teaching demo writes one)."
        self.preset.changed.connect(self.apply_preset)
        self.model_name.changed.connect(self._show_model_options)
        self.train_button.clicked.connect(self.train)
        self.cancel_button.clicked.connect(self.cancel)
        self.result = None
        self._training_cfg = None  # the configuration of the run under way (or last run)
        self.apply_preset(self.preset.value)
        self._show_model_options()
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
        from napari_mil.training.trainer import TrainConfig

        return TrainConfig(model=self.model_name.value, model_cfg=self.model_cfg(), epochs=int(self.epochs.value),
                           lr=float(self.lr.value), seed=int(self.seed.value), mhim=self.mhim_config(),
                           patience=int(self.epochs.value))

    # ---- training ------------------------------------------------------------------------------
    def train(self):
        """Prepare the cohort's features, then train in a worker; curves and maps update live."""
        from napari.qt.threading import create_worker

        from napari_mil.training.cohort import read_cohort

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
        self.progress.max, self.progress.value = len(slides) + cfg.epochs, 0
        self.train_button.enabled, self.cancel_button.enabled = False, True
        self.status.value = f"preparing the features of {len(slides)} slides..."
        worker = create_worker(self._run, slides, cfg, Path(self.features_root.value), Path(self.checkpoint_dir.value),
                               self._encoder_name(), _ignore_errors=True)
        return self._start(worker, self._done, on_update=self._on_update, on_finished=self._idle)

    def _encoder_name(self) -> str:
        return self.state.encoder or "hne_stats"

    def _run(self, slides, cfg, feature_root, checkpoint_dir, encoder_name):
        """Generator run by the worker: cohort progress, epochs and maps as TrainingUpdates."""
        from napari_mil.encoders import create_encoder
        from napari_mil.training.cohort import ensure_features
        from napari_mil.training.data import patient_folds
        from napari_mil.training.trainer import train

        open_bag = self.state.features  # the open slide's features, for the live maps

        def run(report):
            encoder = create_encoder(encoder_name, device="auto")
            bags = ensure_features(slides, encoder, feature_root, progress=lambda p: report(TrainingUpdate("cohort", p)),
                                   cancel=self._cancel.is_set)
            if all(s.record.split for s in slides):
                pick = {name: [b for b, s in zip(bags, slides) if s.record.split == name] for name in ("train", "val")}
            else:
                fold = patient_folds(bags, k=5, seed=cfg.seed)[0]
                pick = {name: [bags[i] for i in fold[name]] for name in ("train", "val")}
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
        from napari_mil.heatmaps import grid_geometry, teacher_student_maps

        model, mhim = holder.get("model"), holder.get("mhim")
        if bag is None or model is None or mhim is None:
            return None
        size0, step = grid_geometry(bag.attrs, bag.coords)
        was_training = model.training
        try:
            return teacher_student_maps(mhim.teacher, model, bag.features, bag.coords, size0, cfg.mhim,
                                        mhim.current_ratio_h(), 0, step)
        finally:
            model.train(was_training)

    def _on_update(self, update: TrainingUpdate) -> None:
        if update.kind == "cohort":
            p = update.payload
            set_progress(self.progress, p.done)
            self.status.value = f"features {p.done}/{p.total}: {p.slide_id} ({'extracted' if p.extracted else 'cached'})"
            return
        report, maps = update.payload
        set_progress(self.progress, min(self.progress.max, self.progress.value + 1))
        self.loss_plot.add("train", report.epoch, report.train_loss)
        self.loss_plot.add("validation", report.epoch, report.val_loss)
        self.auc_plot.add("validation", report.epoch, report.val_auc)
        self.mask_plot.add("masked", report.epoch, report.mask_ratio)
        self.epoch_label.value = (f"epoch {report.epoch}: loss {report.train_loss:.3f}, val loss {report.val_loss:.3f}, "
                                  f"val AUC {report.val_auc:.3f}, {report.mask_ratio:.0%} masked, {report.seconds:.1f} s")
        if maps is not None:
            self._show_maps(maps)

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
        from napari_mil.training.trainer import load_checkpoint, load_teacher

        self.result = result
        state = self.state
        _, meta = load_checkpoint(result.checkpoint)
        state.model, state.model_meta = result.model.cpu().eval(), meta
        state.teacher = load_teacher(result.checkpoint, meta)  # the best epoch's, as the student
        state.mhim = self._training_cfg.mhim  # as trained, whatever the fields say now
        set_progress(self.progress, self.progress.max)
        auc = result.val_metrics.get("auc", float("nan"))
        self._say(f"trained {result.best_epoch} epochs (best); validation AUC {auc:.3f}, threshold "
                  f"{result.threshold:.2f}; checkpoint {result.checkpoint}")
        if state.teacher is not None and state.features is not None and state.slide is not None:
            compare = self._compare_dock()
            if compare is not None:
                compare.compare()

    def cancel(self) -> None:
        """Stop at the next bag; the best checkpoint so far is kept."""
        self._cancel.set()
        self.status.value = "cancelling..."
