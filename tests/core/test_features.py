"""Encoders, the feature store and the extraction pipeline: real slides, real torch models."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from napari_mil.encoders import create_encoder, list_encoders, register_encoder
from napari_mil.encoders import base, registry
from napari_mil.errors import EncoderError, ExtractionCancelled, FeatureStoreError
from napari_mil.features.extract import extract_features
from napari_mil.features.store import FeatureBag, feature_path
from napari_mil.slide import open_slide
from napari_mil.tiling import make_patch_grid, read_patch
from napari_mil.tissue import detect_tissue

CPU = "cpu"


@pytest.fixture(scope="module")
def synthetic_grid(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        return make_patch_grid(slide, detect_tissue(slide), magnification=20, min_tissue=0.3)


@pytest.fixture(scope="module")
def hne():
    return create_encoder("hne_stats", device=CPU)


def patches(slide_path, grid, n=6):
    with open_slide(slide_path) as slide:
        return torch.from_numpy(np.stack([read_patch(slide, grid, i) for i in range(n)]))


# ---- encoders ---------------------------------------------------------------------------
def test_registry_lists_builtins_with_dims():
    specs = {s.name: s for s in list_encoders()}
    assert specs["hne_stats"].dim == 38 and specs["resnet50_trunc"].dim == 1024 and specs["random_cnn"].dim == 256


def test_unknown_encoder_names_the_known_ones():
    with pytest.raises(EncoderError, match="known encoders: .*hne_stats.*resnet50_trunc"):
        create_encoder("resnet51", device=CPU)


def test_hne_stats_separates_tumour_from_stroma(synthetic_slide, synthetic_grid, hne):
    from napari_mil.synthetic import SyntheticSlide
    from napari_mil.tiling import tissue_fractions
    from napari_mil.tissue import TissueMask

    info = SyntheticSlide.load(synthetic_slide.path)
    tumour = tissue_fractions(TissueMask(info.tumour_mask(), (32, 32)), synthetic_grid.coords, synthetic_grid.patch_size_level0)
    with open_slide(synthetic_slide.path) as slide:
        batch = torch.from_numpy(np.stack([read_patch(slide, synthetic_grid, i) for i in range(len(synthetic_grid))]))
    feats = hne(batch).numpy()
    assert feats.shape == (len(synthetic_grid), 38) and np.isfinite(feats).all()
    haematoxylin_mean = feats[:, 1]
    assert haematoxylin_mean[tumour > 0.9].mean() > haematoxylin_mean[tumour < 0.1].mean() + 0.2


def test_random_cnn_is_deterministic(synthetic_slide, synthetic_grid):
    batch = patches(synthetic_slide.path, synthetic_grid, 4)
    a = create_encoder("random_cnn", device=CPU)(batch)
    b = create_encoder("random_cnn", device=CPU)(batch)
    assert a.shape == (4, 256)
    torch.testing.assert_close(a, b)


def test_resnet50_trunc_from_a_torchvision_layout_file(tmp_path, synthetic_slide, synthetic_grid):
    from napari_mil.encoders.resnet import _resnet50_trunc

    reference = _resnet50_trunc().eval()
    state = reference.state_dict()
    # a torchvision checkpoint also has layer4 and fc: they must be ignored
    state["layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    state["fc.weight"] = torch.zeros(1000, 2048)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    encoder = create_encoder("resnet50_trunc", weights=path, device=CPU)
    batch = patches(synthetic_slide.path, synthetic_grid, 2)
    out = encoder(batch)
    assert out.shape == (2, 1024) and encoder.weights_hash != ""
    with torch.inference_mode():
        expected = reference(encoder.transform(batch))
    torch.testing.assert_close(out, expected)


def test_resnet50_trunc_wrong_and_corrupt_weights(tmp_path):
    from napari_mil.encoders.resnet import _resnet50_trunc

    state = _resnet50_trunc().state_dict()
    del state["layer3.5.conv3.weight"]
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(EncoderError, match="does not fit resnet50_trunc: 1 missing .*layer3.5.conv3.weight.*conv1.weight"):
        create_encoder("resnet50_trunc", weights=tmp_path / "wrong.pth", device=CPU)
    (tmp_path / "corrupt.pth").write_bytes(b"\x80\x04garbage" * 100)
    with pytest.raises(EncoderError, match="cannot read weights file corrupt.pth"):
        create_encoder("resnet50_trunc", weights=tmp_path / "corrupt.pth", device=CPU)
    with pytest.raises(EncoderError, match="does not exist"):
        create_encoder("resnet50_trunc", weights=tmp_path / "missing.pth", device=CPU)


def test_pickles_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        create_encoder("resnet50_trunc", weights=tmp_path / "evil.pth", device=CPU)


def test_resnet50_trunc_without_weights_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(EncoderError, match="--weights"):
        create_encoder("resnet50_trunc", device=CPU)


def test_torchscript_user_model(tmp_path, synthetic_slide, synthetic_grid):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    path = tmp_path / "tiny.pt"
    torch.jit.script(model).save(str(path))
    (tmp_path / "tiny.pt.json").write_text(json.dumps({"input_size": 96}))
    encoder = create_encoder(f"torchscript:{path}", device=CPU)
    assert encoder.dim == 8 and encoder.input_size == 96
    assert encoder(patches(synthetic_slide.path, synthetic_grid, 3)).shape == (3, 8)
    (tmp_path / "bad.pt").write_text("nope")
    with pytest.raises(EncoderError, match="not a TorchScript model"):
        create_encoder(f"torchscript:{tmp_path / 'bad.pt'}", device=CPU)


def test_python_entry_point_encoder(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(
        "import torch\n"
        "from napari_mil.encoders.transforms import BatchTransform\n"
        "def build(weights, device):\n"
        "    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())\n"
        "    return model, BatchTransform(32, None), torch.float32\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    encoder = create_encoder("module:my_encoders:build", device=CPU)
    assert encoder.dim == 12
    assert encoder(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)).shape == (2, 12)


def test_entry_point_group_and_runtime_registration(monkeypatch, tmp_path):
    import importlib.metadata

    (tmp_path / "plugin_enc.py").write_text(
        "import torch\n"
        "from napari_mil.encoders import Encoder\n"
        "from napari_mil.encoders.transforms import BatchTransform\n"
        "def build(weights, device):\n"
        "    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n"
        "    return Encoder('plugin_mean', model, BatchTransform(16, None), torch.float32, 3, 16, 'none', device)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("plugin_mean", "plugin_enc:build", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the plugins registered here go with the test
    assert "plugin_mean" in {s.name for s in list_encoders()}
    assert create_encoder("plugin_mean", device=CPU).dim == 3

    @register_encoder("runtime_mean", dim=3)
    def build(weights, device):
        return create_encoder("plugin_mean", device=device)

    assert "runtime_mean" in {s.name for s in list_encoders()}


# ---- the store --------------------------------------------------------------------------
def test_bag_round_trip_is_atomic(tmp_path):
    bag = FeatureBag(np.random.rand(5, 7).astype(np.float32), np.arange(10).reshape(5, 2), {"encoder": "x", "patch_size": 256})
    path = bag.save(tmp_path / "features_x" / "s.h5")
    back = FeatureBag.load(path)
    np.testing.assert_allclose(back.features, bag.features)
    np.testing.assert_array_equal(back.coords, bag.coords)
    assert back.attrs["encoder"] == "x" and back.dim == 7
    assert [p.name for p in path.parent.iterdir()] == ["s.h5"]


def test_reads_trident_and_clam_feature_files(tmp_path):
    coords = np.array([[0, 0], [512, 0], [0, 512]])
    with h5py.File(tmp_path / "trident.h5", "w") as fh:  # TRIDENT: attrs on coords
        fh.create_dataset("features", data=np.ones((3, 1024), np.float32))
        c = fh.create_dataset("coords", data=coords)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40, "target_magnification": 20})
    with h5py.File(tmp_path / "clam.h5", "w") as fh:  # CLAM: bare datasets
        fh.create_dataset("features", data=np.ones((3, 1024), np.float32))
        fh.create_dataset("coords", data=coords)
    trident, clam = FeatureBag.load(tmp_path / "trident.h5"), FeatureBag.load(tmp_path / "clam.h5")
    assert trident.attrs["patch_size_level0"] == 512 and len(trident) == 3 and trident.dim == 1024
    assert len(clam) == 3 and clam.encoder == "unknown"


def test_bad_feature_files(tmp_path):
    with h5py.File(tmp_path / "nofeat.h5", "w") as fh:
        fh.create_dataset("coords", data=np.zeros((2, 2)))
    with pytest.raises(FeatureStoreError, match="needs 'features' and 'coords'"):
        FeatureBag.load(tmp_path / "nofeat.h5")
    with h5py.File(tmp_path / "mismatch.h5", "w") as fh:
        fh.create_dataset("features", data=np.zeros((3, 4)))
        fh.create_dataset("coords", data=np.zeros((2, 2)))
    with pytest.raises(FeatureStoreError, match="do not match"):
        FeatureBag.load(tmp_path / "mismatch.h5")


def test_feature_dimension_mismatch_is_explained():
    bag = FeatureBag(np.zeros((4, 38)), np.zeros((4, 2)), {"encoder": "hne_stats"})
    with pytest.raises(FeatureStoreError, match="38 dimensions .*hne_stats.* expects 1024"):
        bag.require_dim(1024)


# ---- extraction -------------------------------------------------------------------------
def test_extraction_count_equals_grid_on_cmu1_and_synthetic(tmp_path, cmu1_path, synthetic_slide, synthetic_grid, hne):
    with open_slide(cmu1_path) as slide:
        grid = make_patch_grid(slide, detect_tissue(slide), magnification=20)
    result = extract_features(cmu1_path, grid, hne, tmp_path, num_workers=2, batch_size=16)
    assert len(result.bag) == len(grid) and result.bag.dim == 38 and not result.cached
    np.testing.assert_array_equal(result.bag.coords, grid.coords)
    stored = FeatureBag.load(feature_path(tmp_path, "hne_stats", "CMU-1-Small-Region"))
    assert stored.attrs["patch_size_level0"] == 256 and stored.attrs["encoder"] == "hne_stats"
    assert stored.features.dtype == np.float16

    result = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path, num_workers=0)
    assert len(result.bag) == len(synthetic_grid)


def test_rerun_uses_the_cache_and_other_inputs_do_not(tmp_path, synthetic_slide, synthetic_grid, hne):
    first = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path, num_workers=0)
    mtime = first.path.stat().st_mtime_ns
    again = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path, num_workers=0)
    assert again.cached and again.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.bag.features, first.bag.features)
    fewer = make_patch_grid_subset(synthetic_grid, 10)
    changed = extract_features(synthetic_slide.path, fewer, hne, tmp_path, num_workers=0)
    assert not changed.cached and len(changed.bag) == 10
    # the same encoder with other preprocessing is another encoder as far as the cache goes
    from dataclasses import replace

    from napari_mil.encoders.transforms import BatchTransform

    finer = replace(hne, transform=BatchTransform(128, None, (0, 0, 0), (1, 1, 1)), input_size=128)
    assert not extract_features(synthetic_slide.path, fewer, finer, tmp_path, num_workers=0).cached


def make_patch_grid_subset(grid, n):
    from dataclasses import replace

    return replace(grid, coords=grid.coords[:n], tissue_fraction=grid.tissue_fraction[:n])


def test_cancel_keeps_chunks_and_resume_finishes_identically(tmp_path, synthetic_slide, synthetic_grid, hne):
    reference = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "ref", num_workers=0, chunk_size=16, batch_size=16)
    calls = []

    def cancel_after_three_batches():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(ExtractionCancelled, match="next run resumes"):
        extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "run", num_workers=0, chunk_size=16,
                         batch_size=16, cancel=cancel_after_three_batches)
    final = feature_path(tmp_path / "run", "hne_stats", synthetic_grid.slide_name)
    assert not final.exists()
    partial = final.with_name(final.stem + ".partial.h5")
    with h5py.File(partial) as fh:
        assert fh["chunk_done"][:].sum() == 3
    resumed = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "run", num_workers=0, chunk_size=16, batch_size=16)
    assert resumed.resumed_from == 48 and not partial.exists()
    np.testing.assert_array_equal(resumed.bag.features, reference.bag.features)


def test_out_of_memory_halves_the_batch(tmp_path, synthetic_slide, synthetic_grid, hne):
    class SmallGpu:
        def __init__(self):
            self.largest = 0

        def __call__(self, batch):
            if len(batch) > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            self.largest = max(self.largest, len(batch))
            return hne(batch)

    gpu = SmallGpu()
    wrapped = _CallWrapper(hne, gpu)
    with pytest.warns(UserWarning, match="batch size halved"):
        result = extract_features(synthetic_slide.path, synthetic_grid, wrapped, tmp_path, num_workers=0, batch_size=32)
    assert result.batch_size == 8 and gpu.largest == 8 and len(result.bag) == len(synthetic_grid)
    reference = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "ref", num_workers=0, batch_size=32)
    np.testing.assert_array_equal(result.bag.features, reference.bag.features)


class _CallWrapper:
    """An encoder whose call goes through ``fn`` (to simulate a device)."""

    def __init__(self, encoder, fn):
        self.__dict__.update(encoder.__dict__)
        self._fn = fn

    def __call__(self, batch):
        return self._fn(batch)


def test_unreadable_region_is_skipped_and_recorded(tmp_path, synthetic_slide, synthetic_grid, hne):
    """Garble one JPEG tile inside the tissue: its patches are skipped, the rest encoded."""
    import shutil

    import tifffile

    broken = tmp_path / "broken.tif"
    shutil.copy(synthetic_slide.path, broken)
    x, y = synthetic_grid.coords[len(synthetic_grid) // 2]
    with tifffile.TiffFile(broken) as tf:
        page = tf.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * across + x // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(broken, "r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(b"\x00" * (count // 3))
    with open_slide(broken) as slide:  # the slide still opens: only this tile is damaged
        assert slide.dimensions == (8192, 6144)
    result = extract_features(broken, synthetic_grid, hne, tmp_path, num_workers=2, batch_size=8)
    assert 1 <= result.skipped <= 4
    assert [x, y] in result.bag.skipped_coords.tolist()
    assert len(result.bag) == len(synthetic_grid) - result.skipped


def test_full_disk_keeps_finished_chunks(tmp_path, synthetic_slide, synthetic_grid, hne, monkeypatch):
    """The second chunk's write fails with ENOSPC: a clear error, and the first chunk is kept."""
    original = h5py.Dataset.__setitem__
    writes = []

    def fill_up(self, key, value):
        if self.name == "/features" and isinstance(key, slice):
            writes.append(key)
            if len(writes) > 1:
                raise OSError(28, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fill_up)
    with pytest.raises(FeatureStoreError, match="disk is full"):
        extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path, num_workers=0, chunk_size=16, batch_size=16)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", original)
    resumed = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path, num_workers=0, chunk_size=16, batch_size=16)
    assert resumed.resumed_from == 16 and len(resumed.bag) == len(synthetic_grid)


def test_cli_extract_writes_features_and_a_manifest(tmp_path, cmu1_path):
    cmd = [sys.executable, "-m", "napari_mil.cli", "extract", str(cmu1_path), "--out", str(tmp_path), "--workers", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "features_hne_stats" / "CMU-1-Small-Region.h5").exists()
    manifests = sorted(tmp_path.glob("extract_manifest_*.json"))
    manifest = json.loads(manifests[-1].read_text())
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["encoder"]["dim"] == 38
    assert manifest["slides"][0]["state"] == "extracted"
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert second.returncode == 0 and "cached" in second.stdout
    bad = subprocess.run(cmd[:-4] + ["--out", str(tmp_path), "--encoder", "uni_v3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "known encoders" in bad.stderr and "Traceback" not in bad.stderr


def test_reading_workers_start_from_a_fork_server_beside_other_threads(tmp_path, synthetic_slide, synthetic_grid, hne):
    """In the viewer other threads read the slide; forking then could copy a held OpenSlide lock into
    the reading worker. With another thread alive the workers come from a fork server, and the
    features are those of an in-process run."""
    import threading

    from napari_mil.features.extract import reader_context

    assert reader_context(0) is None
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        assert reader_context(1).get_start_method() == "forkserver"
        beside = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "a", num_workers=1, batch_size=16)
    finally:
        stop.set()
        other.join()
    alone = extract_features(synthetic_slide.path, synthetic_grid, hne, tmp_path / "b", num_workers=0, batch_size=16)
    np.testing.assert_array_equal(beside.bag.features, alone.bag.features)
