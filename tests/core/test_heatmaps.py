"""Attention maps and their exports: normalisations, placement on the slide, QuPath GeoJSON, CSV,
PNG overlays and top-k patches (read from the real CMU-1 slide)."""

import csv
import json

import numpy as np
import pytest

from napari_mil.errors import NapariMilError
from napari_mil.exports import export_csv, export_geojson, export_overlay_png, export_top_k, render_overlay
from napari_mil.heatmaps import AttentionMap, shared_limits
from napari_mil.usecases.prediction import model_map, teacher_student_maps


def _map(values=None, name="teacher", masked=None, step=None):
    # a 4 x 3 grid of 256 px patches starting at (512, 768), one cell (row 1, col 2) without tissue
    coords = [(512 + 256 * c, 768 + 256 * r) for r in range(3) for c in range(4) if (r, c) != (1, 2)]
    values = np.arange(1, len(coords) + 1, dtype=float) if values is None else np.asarray(values, float)
    return AttentionMap(np.array(coords), values / values.sum(), 256, step, name, masked or {})


def test_normalisations():
    m = _map()
    raw = m.normalised("raw")
    assert raw.sum() == pytest.approx(1) and np.allclose(raw, m.values)
    mm = m.normalised("minmax")
    assert mm.min() == 0 and mm.max() == 1 and np.all(np.diff(mm) > 0)
    rank = m.normalised("rank")
    assert rank[np.argmax(m.values)] == 1 and rank[np.argmin(m.values)] == 0
    uniform = AttentionMap(m.coords, np.full(len(m), 1 / len(m)), 256)
    assert np.allclose(uniform.normalised("log"), 0)  # log10(N a): 0 is average attention
    assert uniform.normalised("minmax").tolist() == [0.5] * len(m)
    ties = AttentionMap(m.coords[:3], [0.25, 0.5, 0.25], 256)
    assert ties.ranks().tolist() == [2.5, 1, 2.5]
    from scipy.stats import rankdata

    many = np.random.default_rng(0).integers(0, 50, 1000).astype(float)  # many ties
    big = AttentionMap(np.stack([np.arange(1000) * 256, np.zeros(1000)], 1), many, 256)
    assert np.array_equal(big.ranks(), rankdata(-many)) and np.array_equal(big.ranks(True), rankdata(many))
    with pytest.raises(NapariMilError, match="unknown normalisation 'sqrt'"):
        m.normalised("sqrt")


def test_image_placement_and_lookup():
    m = _map()
    img = m.image("raw")
    assert img.shape == (3, 4) and np.isnan(img[1, 2]) and np.isfinite(img).sum() == len(m)
    row, col, _ = m.grid_index()
    assert np.allclose(img[row, col], m.values)
    scale, translate = m.placement()
    for i, (x, y) in enumerate(m.coords):
        for dy, dx in ((0, 0), (255, 255), (128, 3)):  # any level-0 pixel inside the patch ...
            assert m.patch_at(y + dy, x + dx) == i
            # ... lands on the patch's image pixel under napari's world -> data transform
            r = int(np.floor((y + dy - translate[0]) / scale[0] + 0.5))
            c = int(np.floor((x + dx - translate[1]) / scale[1] + 0.5))
            assert (r, c) == (row[i], col[i])
    assert m.patch_at(768 + 256 + 10, 512 + 512 + 10) is None  # the empty cell
    assert m.patch_at(0, 0) is None


def test_top_k_masks_and_bad_input():
    values = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 0.5])
    m = _map(values, masked={"high": values >= 9, "random": values == 1})
    assert m.top_k(3).tolist() == [9, 2, 6] and len(m.top_k(50)) == len(m) and len(m.top_k(0)) == 0
    assert m.mask_image("high").sum() == 2 and m.mask_image("low").sum() == 0
    row, col, _ = m.grid_index()
    assert m.mask_image("random")[row[1], col[1]] == 1
    with pytest.raises(NapariMilError, match="different grids"):
        AttentionMap(m.coords, m.values[:-1], 256)
    with pytest.raises(NapariMilError, match="NaN"):
        AttentionMap(m.coords, np.r_[m.values[:-1], np.nan], 256)
    with pytest.raises(NapariMilError, match="at least one patch"):
        AttentionMap(np.zeros((0, 2)), [], 256)
    with pytest.raises(NapariMilError, match="does not fit"):
        _map(masked={"high": np.zeros(3, bool)})


def test_mask_outlines_frame_exactly_the_masked_patches():
    values = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 0.5])
    m = _map(values, masked={"high": values >= 9})
    frames = m.mask_outlines("high", cell=8)
    assert frames.shape == (3 * 8, 4 * 8) and frames.dtype == np.uint8
    scale, translate = m.placement(8)
    for i, (x, y) in enumerate(m.coords):
        # the patch's 8 x 8 block under napari's world -> data transform of its top-left pixel
        r0 = int(np.floor((y - translate[0]) / scale[0] + 0.5))
        c0 = int(np.floor((x - translate[1]) / scale[1] + 0.5))
        block = frames[r0 : r0 + 8, c0 : c0 + 8]
        assert block.shape == (8, 8)
        if values[i] >= 9:  # a one-pixel frame, hollow inside
            assert block[[0, -1]].all() and block[:, [0, -1]].all() and not block[1:-1, 1:-1].any()
        else:
            assert not block.any()
    assert m.mask_outlines("low").sum() == 0


def test_shared_limits_cover_both_maps():
    a, b = _map(name="teacher"), _map(np.arange(11, 0, -1) ** 2, name="student")
    assert shared_limits([a, b], "minmax") == (0, 1)
    low, high = shared_limits([a, b], "log")
    assert low <= min(a.normalised("log").min(), b.normalised("log").min())
    assert high >= max(a.normalised("log").max(), b.normalised("log").max())
    assert shared_limits([a, b], "raw")[1] == pytest.approx(max(a.values.max(), b.values.max()))


def test_csv_and_geojson_exports(tmp_path):
    values = np.arange(1, 12, dtype=float)
    teacher = _map(values, "teacher")
    student = _map(values[::-1], "student", masked={"high": values > 9, "low": values < 2, "random": values == 5})
    maps = {"teacher": teacher, "student": student}

    path = export_csv(tmp_path / "patches.csv", maps)
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 and {"x", "y", "width", "height", "teacher rank", "student masked random-high"} <= set(rows[0])
    top = next(r for r in rows if r["teacher rank"] == "1.0")
    assert (int(top["x"]), int(top["y"])) == tuple(teacher.coords[np.argmax(teacher.values)])
    assert sum(int(r["student masked low"]) for r in rows) == 1
    assert float(rows[0]["teacher attention"]) == pytest.approx(teacher.values[0])

    path = export_geojson(tmp_path / "maps.geojson", maps)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 11
    f = data["features"][3]
    ring = f["geometry"]["coordinates"][0]
    x, y = teacher.coords[3]
    assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] == [x, y] and ring[2] == [x + 256, y + 256]
    assert f["properties"]["objectType"] == "detection"
    assert f["properties"]["measurements"]["teacher attention"] == pytest.approx(teacher.values[3])
    assert f["properties"]["measurements"]["student masked random"] == 0.0
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind

    other = AttentionMap(teacher.coords + 1, teacher.values, 256, name="other")
    with pytest.raises(NapariMilError, match="other patches"):
        export_csv(tmp_path / "bad.csv", {"teacher": teacher, "other": other})


def test_overlay_png(tmp_path):
    from PIL import Image

    from napari_mil.exports import colormap_lut

    m = _map()
    out = render_overlay(m, dimensions=(2048, 1792), downsample=32, how="minmax")
    assert out.shape == (56, 64, 4)
    assert out[0, 0, 3] == 0  # no patch: transparent
    x, y = m.coords[np.argmax(m.values)]
    assert out[y // 32 + 4, x // 32 + 4].tolist() == colormap_lut("inferno")[255].tolist()
    x, y = m.coords[np.argmin(m.values)]
    assert out[y // 32 + 4, x // 32 + 4].tolist() == colormap_lut("inferno")[0].tolist()
    assert out[(768 + 256) // 32 + 4, (512 + 512) // 32 + 4, 3] == 0  # the empty cell
    background = np.full((100, 100, 3), 200, np.uint8)
    blended = render_overlay(m, (2048, 1792), 32, background=background, opacity=0.5)
    assert blended[0, 0].tolist() == [200, 200, 200, 255]
    path = export_overlay_png(tmp_path / "map.png", m, (2048, 1792), downsample=16)
    assert Image.open(path).size == (128, 112)


def test_top_k_patches_from_the_real_slide(cmu1_path, tmp_path):
    from napari_mil.slide import open_slide

    with open_slide(cmu1_path) as slide:
        w, h = slide.dimensions
        coords = np.array([(x, y) for y in range(0, h - 256, 256) for x in range(0, w - 256, 256)])
        values = np.random.default_rng(0).random(len(coords))
        m = AttentionMap(coords, values / values.sum(), 256, name="student")
        paths = export_top_k(tmp_path / "top", slide, m, k=3, out_size=128)
        assert [p.name.split("_")[1] for p in paths] == ["rank001", "rank002", "rank003"]
        best = m.coords[np.argmax(values)]
        assert paths[0].name == f"student_rank001_x{best[0]}_y{best[1]}.png"
        from PIL import Image

        img = np.asarray(Image.open(paths[0]))
        region = slide.read_region(tuple(int(v) for v in best), 0, (256, 256))[..., :3]
        expected = np.asarray(Image.fromarray(np.ascontiguousarray(region)).resize((128, 128), Image.Resampling.BILINEAR))
        assert img.shape == (128, 128, 3) and np.abs(img.astype(int) - expected).mean() < 1


def test_teacher_student_maps_follow_the_teacher_masks():
    import torch

    from napari_mil.features.store import FeatureBag
    from napari_mil.geometry import PatchGeometry
    from napari_mil.models import create_model
    from napari_mil.training.mhim import MHIMConfig, make_teacher

    torch.manual_seed(0)
    student = create_model("abmil", in_dim=8)
    teacher = make_teacher(student)
    with torch.no_grad():
        teacher.attn_w.weight.add_(torch.randn_like(teacher.attn_w.weight))  # a teacher that differs
    features = np.random.default_rng(1).normal(size=(11, 8)).astype(np.float32)
    coords = _map().coords
    cfg = MHIMConfig(mask_ratio_h=0.3, mask_ratio_hr=1.0, mask_ratio_l=0.2)
    bag = FeatureBag(features, coords, geometry=PatchGeometry(256, 256, 256))
    t, s = teacher_student_maps(teacher, student, bag, cfg)
    full, probs = model_map(teacher, bag)
    assert np.allclose(t.values, full.values, atol=1e-6) and probs.sum() == pytest.approx(1)
    assert t.values.sum() == pytest.approx(1) and s.values.sum() == pytest.approx(1)
    order = np.argsort(-t.values)
    assert set(np.flatnonzero(s.masked["high"])) == set(order[:3])  # int(0.3 * 11) = 3 highest
    assert set(np.flatnonzero(s.masked["low"])) == set(order[-2:])  # int(0.2 * 11) = 2 lowest
    masked = s.masked["high"] | s.masked["low"] | s.masked["random"]
    assert np.all(s.values[masked] == 0) and np.all(s.values[~masked] > 0)
    kept_out = student(torch.from_numpy(features[~masked])[None]).attention[0].detach().numpy()
    assert np.allclose(s.values[~masked], kept_out, atol=1e-6)


def test_cli_export(cmu1_path, tmp_path, capsys):
    import h5py

    from napari_mil.cli import main

    coords = np.array([(x, y) for y in range(0, 1792, 256) for x in range(0, 1792, 256)])
    values = np.random.default_rng(2).random(len(coords))
    path = tmp_path / "attention" / "CMU-1-Small-Region.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as fh:
        fh["coords"], fh["attention"] = coords, values / values.sum()
        fh.attrs.update({"patch_size_level0": 512, "patch_size": 256, "overlap": 128})  # 50% overlap: step 256
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--formats", "geojson,csv,png,topk",
                 "--slide", str(cmu1_path), "--k", "2", "--downsample", "16"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and all(tmp_path.joinpath(p).exists() for p in printed)
    feature = json.loads((tmp_path / "out" / "CMU-1-Small-Region.geojson").read_text())["features"][0]
    assert feature["geometry"]["coordinates"][0][2] == [512, 512]  # the patch extent, not the step

    plain = tmp_path / "plain.h5"  # a file without geometry: the grid spacing is the patch size
    with h5py.File(plain, "w") as fh:
        fh["coords"], fh["attention"] = coords, values / values.sum()
    assert main(["export", str(plain), "--out", str(tmp_path / "o2"), "--formats", "csv", "-q"]) == 0
    with open(tmp_path / "o2" / "plain.csv") as fh:
        assert next(csv.DictReader(fh))["width"] == "256"

    assert main(["export", str(plain), "--out", str(tmp_path / "o3"), "--formats", "topk"]) == 2
    assert "give --slide" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing.h5"), "--out", str(tmp_path / "o4")]) == 1


def test_outline_is_the_inner_border():
    from napari_mil._napari._layers import outline

    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    edge = outline(mask)
    assert edge.dtype == np.uint8 and edge.sum() == 16  # the 5 x 5 square's rim
    assert not edge[3:6, 3:6].any() and edge[2, 2:7].all() and not (edge.astype(bool) & ~mask).any()
    assert outline(np.ones((3, 3), bool)).sum() == 8  # the image border counts as outside


def test_maps_choose_the_attention_per_call_not_on_the_model():
    """TransMIL-like models get the layer and head as call arguments; the model is left as it was."""
    import torch

    from napari_mil.features.store import FeatureBag
    from napari_mil.geometry import PatchGeometry
    from napari_mil.models.contract import MILOutput
    from napari_mil.training.mhim import MHIMConfig

    class Chooser(torch.nn.Module):
        CHOOSES_ATTENTION = True

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)
            self.calls = []

        def forward(self, x, mask=None, attention_layer=None, attention_head=None):
            self.calls.append((attention_layer, attention_head))
            scores = x[..., 0] * (1 if attention_layer is None else attention_layer + 2)
            attention = torch.softmax(scores if attention_head is None else -scores, 1)
            z = (attention[..., None] * x).sum(1)
            return MILOutput(self.fc(z), z, attention)

    features = np.random.default_rng(3).normal(size=(11, 4)).astype(np.float32)
    bag = FeatureBag(features, _map().coords, geometry=PatchGeometry(256, 256, 256))
    model = Chooser()
    default, _ = model_map(model, bag)
    chosen, _ = model_map(model, bag, attention_layer=0, attention_head=1)
    assert model.calls == [(None, None), (0, 1)] and not hasattr(model, "attention_layer")
    assert np.argmax(default.values) == np.argmax(features[:, 0]) and np.argmax(chosen.values) == np.argmin(features[:, 0])
    cfg = MHIMConfig(mask_ratio_h=0.2, mask_ratio_hr=1.0, mask_ratio_l=0.2)
    t, s = teacher_student_maps(Chooser(), model, bag, cfg, attention_layer=-1, attention_head=0)
    assert model.calls[-1] == (-1, 0) and np.allclose(t.values.sum(), 1) and s.masked["high"].any()
