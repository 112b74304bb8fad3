"""The Model dock: load a checkpoint (napari-mil's, or the official TransMIL, MHIM-MIL or CLAM
code's), run it on the open slide's features, and show the prediction and the attention map."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, FileEdit, Label, PushButton

from napari_mil._napari._workers import DockBase
from napari_mil.errors import NapariMilError

if TYPE_CHECKING:
    import napari



def model_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered model, for a dock's model menu."""
    from napari_mil.models import list_models, model_label

    return [(model_label(name), name) for name in list_models()]

CHECKPOINT_FILTER = "*.json *.safetensors *.pt *.pth *.ckpt *.bin"


class ModelWidget(DockBase):
    """Choose the model, load a checkpoint, run inference on the slide."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(napari_viewer)
        self.model_name = ComboBox(label="Model", choices=model_choices(), value="abmil",
                                   tooltip="the architecture; a checkpoint sets it to its own")
        self.checkpoint = FileEdit(label="Checkpoint", mode="r", filter=CHECKPOINT_FILTER)
        self.part = ComboBox(label="MHIM-MIL part", choices=["student", "teacher"], value="student",
                             tooltip="for MHIM-MIL files: which network predicts (the other is kept to compare)")
        self.load_button = PushButton(text="Load checkpoint")
        self.infer_button = PushButton(text="Run inference")
        self.prediction = Label(value="")
        self.status.value = "Load a checkpoint, or train one in the Retrain dock."
        self.extend([self.model_name, self.checkpoint, self.part, self.load_button, self.infer_button,
                     self.prediction, self.status])
        self.load_button.clicked.connect(self.load)
        self.infer_button.clicked.connect(self.infer)
        self.native.setMaximumWidth(460)

    def load(self, path: str | Path | None = None):
        from napari.qt.threading import create_worker

        path = Path(path) if path else Path(self.checkpoint.value)
        if not str(path) or path == Path(".") or path.is_dir():
            self._say("choose a checkpoint file first", error=True)
            return None
        features = self.state.features
        self.status.value = f"loading {path.name}..."
        from napari_mil.training.checkpoints import load_model_and_teacher

        worker = create_worker(load_model_and_teacher, path, self.part.value,
                               features.dim if features is not None else None, _ignore_errors=True)
        return self._start(worker, lambda result: self._loaded(path, *result))

    def _loaded(self, path: Path, model, meta, teacher) -> None:
        from napari_mil.models import model_label
        from napari_mil.training.mhim import MHIMConfig

        mhim = (meta.get("train_config") or {}).get("mhim")  # the masking it was trained with, if any
        self.state.set_model(model, meta, teacher, MHIMConfig(**mhim) if mhim else None)
        self.model_name.value = meta["model"]
        source = meta.get("layout", "napari-mil")
        extra = " and its MHIM-MIL teacher" if teacher is not None else ""
        label = model_label(meta["model"])
        self._say(f"loaded a {label} ({source}, {meta['in_dim']}-d features, {meta['n_classes']} classes){extra} "
                  f"from {path.name}")

    def infer(self):
        """Run the model on the slide's features in a worker; show the prediction and the map."""
        from napari.qt.threading import create_worker

        from napari_mil.usecases.prediction import model_map

        state = self.state
        try:
            if state.features is None:
                raise NapariMilError("no features yet: extract them in the Features dock")
            if state.model is None:
                raise NapariMilError("no model yet: load a checkpoint, or train one in the Retrain dock")
            state.features.require_dim(state.model_meta["in_dim"], "the model")
        except NapariMilError as exc:
            self._say(str(exc), error=True)
            return None
        bag = state.features
        self.status.value = f"running the model on {len(bag)} patches..."
        worker = create_worker(model_map, state.model, bag, "attention", _ignore_errors=True)
        return self._start(worker, lambda result: self._show(*result))

    def _show(self, amap, probs) -> None:
        from napari_mil._napari._layers import show_map

        meta, slide = self.state.model_meta, self.state.slide
        threshold = float(meta.get("threshold", 0.5))
        p = float(probs[-1])
        verdict = "positive" if p >= threshold else "negative"
        self.prediction.value = f"p(class {len(probs) - 1}) = {p:.3f} → {verdict} (threshold {threshold:.2f})"
        name = f"{slide.name} attention" if slide is not None else "attention"
        if slide is not None:
            show_map(self.viewer, name, slide, amap)
        self.state.attention = amap
        self._say(f"{slide.name if slide else 'slide'}: {self.prediction.value}")
