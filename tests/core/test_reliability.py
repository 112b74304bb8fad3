"""No silent wrong results, no path from an ID to a file it should not touch: results, paths,
file systems and options (docs/reliability.md lists each case with its test)."""

import csv
import errno
import json
import os
import resource
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from napari_mil.cli import main
from napari_mil.errors import NapariMilError
from napari_mil.features.store import FeatureBag, feature_path

ENCODER = "toy"
DIM = 8
CMU1 = "CMU-1-Small-Region"


def run_cli(*args, memory_gib=None):
    """The CLI in a subprocess (optionally under an address-space limit, so that a command that
    would allocate tens of GB fails fast instead of taking the machine)."""
    limit = None
    if memory_gib:
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (memory_gib * 2**30, memory_gib * 2**30))
    return subprocess.run([sys.executable, "-m", "napari_mil.cli", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit)


def write_bag(root, name, features=None, n=24):
    rng = np.random.default_rng(len(name))
    features = rng.normal(size=(n, DIM)).astype(np.float32) if features is None else features
    coords = np.stack([np.arange(len(features)) % 6, np.arange(len(features)) // 6], 1) * 256
    attrs = {"encoder": ENCODER, "patch_size_level0": 256, "patch_size": 256, "overlap": 0, "name": name}
    return FeatureBag(features, coords, attrs).save(feature_path(root, ENCODER, name))


def write_checkpoint(path, threshold=0.5):
    from napari_mil.models import create_model
    from napari_mil.training.checkpoints import save_checkpoint

    model = create_model("abmil", DIM, 2)
    return save_checkpoint(path, model, {"model": "abmil", "in_dim": DIM, "n_classes": 2, "encoder": ENCODER,
                                         "threshold": threshold})


@pytest.fixture
def cohort(tmp_path):
    """Bags a, b (finite), nan and inf under features_toy/, and a checkpoint."""
    for name in ("a", "b"):
        write_bag(tmp_path, name)
    bad = np.random.default_rng(0).normal(size=(24, DIM)).astype(np.float32)
    write_bag(tmp_path, "nan", np.where(np.arange(24)[:, None] == 3, np.nan, bad))
    write_bag(tmp_path, "inf", np.where(np.arange(24)[:, None] == 5, np.inf, bad))
    return tmp_path, write_checkpoint(tmp_path / "models" / "abmil_fold0")


def predict(root, checkpoint, *slides, out="p"):
    return main(["predict", *slides, "--checkpoint", str(checkpoint), "--features", str(root),
                 "--out", str(root / out), "-q"])


def errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


# ---- 1. NaN and inf never become a class ------------------------------------------------------
def test_nan_or_inf_features_are_a_per_slide_error_and_the_batch_goes_on(cohort, capsys):
    root, checkpoint = cohort
    assert predict(root, checkpoint, "a", "nan", "inf", "b") == 1
    said = errors(capsys)
    assert len(said) == 2
    assert said[0].startswith("error: nan: 1 of 24 patches have NaN or infinite features, so no class is given")
    assert said[1].startswith("error: inf: 1 of 24 patches")
    rows = list(csv.DictReader(open(root / "p" / "predictions.csv")))
    assert [r["slide_id"] for r in rows] == ["a", "b"]
    assert sorted(p.name for p in (root / "p" / "attention").iterdir()) == ["a.h5", "b.h5"]


def test_nan_probabilities_or_threshold_never_become_a_class(cohort):
    import torch

    from napari_mil.models.contract import MILOutput
    from napari_mil.training.checkpoints import load_for_prediction
    from napari_mil.usecases.prediction import predict_bag

    root, checkpoint = cohort
    model, meta = load_for_prediction(checkpoint)
    bag = FeatureBag.load(feature_path(root, ENCODER, "a"))

    class NaNLogits(torch.nn.Module):  # a damaged model: finite attention, NaN probabilities
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, **_):
            n = x.shape[1]
            return MILOutput(logits=torch.full((1, 2), float("nan")), embedding=torch.zeros(1, 4),
                             attention=torch.full((1, n), 1 / n))

    with pytest.raises(NapariMilError, match="a: the model gives NaN or infinite probabilities"):
        predict_bag(NaNLogits(), meta, bag, "a")
    for threshold in (float("nan"), "high", 1.5):
        with pytest.raises(NapariMilError, match="threshold .* is not a probability"):
            predict_bag(model, {**meta, "threshold": threshold}, bag, "a")
    assert predict_bag(model, meta, bag, "a").predicted in (0, 1)


def test_cross_validation_gives_no_class_for_nan_test_probabilities(tmp_path, monkeypatch):
    import napari_mil.usecases.cross_validation as cv
    from napari_mil.training.data import Bag
    from napari_mil.training.trainer import TrainConfig

    rng = np.random.default_rng(0)
    bags = [Bag(f"s{i}", i % 2, f"p{i}", rng.normal(size=(6, 4)).astype(np.float32), np.zeros((6, 2)))
            for i in range(6)]
    folds = [{"train": np.array([0, 1, 2, 3]), "val": np.array([0, 1]), "test": np.array([4, 5])}]
    real = cv.predict_probs

    def nan_probs(model, test, device):  # a model that overflows on the test slides
        probs, rest = real(model, test, device)
        return np.full_like(probs, np.nan), rest

    monkeypatch.setattr(cv, "predict_probs", nan_probs)
    with pytest.raises(cv.FoldError, match="fold 1: .*NaN or infinite probabilities for test slide.*s4, s5"):
        cv.cross_validate(bags, folds, TrainConfig(epochs=1, min_epochs=1, device="cpu"), tmp_path, n_boot=10)
    assert not (tmp_path / "predictions.csv").exists()


# ---- 2. duplicate slide IDs ----------------------------------------------------------------------
def test_a_slide_given_twice_is_refused(cohort, capsys):
    root, checkpoint = cohort
    assert predict(root, checkpoint, "a", "b", "a") == 2
    assert "slide(s) a given more than once" in capsys.readouterr().err
    assert not (root / "p").exists()


def test_duplicate_rows_of_a_train_run_are_refused_with_their_lines(cohort, capsys):
    root, checkpoint = cohort
    models = checkpoint.parent
    (models / "predictions.csv").write_text("slide_id,fold\na,0\nb,0\na,0\n")
    assert main(["predict", "--oof", str(models), "--features", str(root), "--out", str(root / "o")]) == 2
    assert "line 4: slide 'a' is listed twice (first on line 2)" in capsys.readouterr().err


# ---- 3. IDs never reach outside their folder -----------------------------------------------------
@pytest.mark.parametrize("slide_id", ["../features_toy/a", "/data/x", "..", "a\\b", "C:x", ""])
def test_unsafe_ids_are_refused_by_every_path_maker(slide_id):
    from napari_mil.names import UnsafeNameError
    from napari_mil.usecases.prediction import attention_path

    for make in (lambda: feature_path("root", ENCODER, slide_id), lambda: attention_path("out", slide_id)):
        with pytest.raises(UnsafeNameError, match="cannot name a file"):
            make()
    assert attention_path("out", "TCGA-A1-0001.01 (re-scan)") == attention_path("out", "TCGA-A1-0001.01 (re-scan)")


def test_predict_never_writes_outside_out(cohort, capsys):
    root, checkpoint = cohort
    victim = feature_path(root, ENCODER, "a")
    before = victim.read_bytes()
    # the ID names a/a's feature file relative to --out/attention/: it was overwritten by an attention file
    assert predict(root, checkpoint, f"../../features_{ENCODER}/a", "b", out="p") == 1
    assert "cannot name a file (it contains '/')" in errors(capsys)[0]
    assert victim.read_bytes() == before
    assert sorted(p.name for p in (root / "p" / "attention").iterdir()) == ["b.h5"]


def test_out_of_fold_rows_and_checkpoint_names_are_checked(cohort, capsys):
    root, checkpoint = cohort
    models = checkpoint.parent
    (models / "predictions.csv").write_text(f"slide_id,fold\na,0\n../../features_{ENCODER}/b,0\n")
    victim = feature_path(root, ENCODER, "b").read_bytes()
    assert main(["predict", "--oof", str(models), "--features", str(root), "--out", str(root / "o"), "-q"]) == 1
    assert "cannot name a file" in capsys.readouterr().err
    assert feature_path(root, ENCODER, "b").read_bytes() == victim
    assert [p.name for p in (root / "o" / "attention").iterdir()] == ["a.h5"]
    (models / "summary.json").write_text(json.dumps({"folds": [{"fold": 0, "checkpoint": "../../elsewhere"}]}))
    assert main(["predict", "--oof", str(models), "--features", str(root), "--out", str(root / "o2")]) == 2
    assert "checkpoint name '../../elsewhere' cannot name a file" in capsys.readouterr().err


def test_export_names_stay_under_out(cmu1_path, tmp_path, capsys):
    path = attention_file(tmp_path / "att.h5")
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--formats", "topk", "--slide", str(cmu1_path),
                 "--name", "../../escaped"]) == 1
    assert "map name '../../escaped' cannot name a file" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*escaped*"))


# ---- 4. images are sized before they are made ----------------------------------------------------
def attention_file(path, coords=None, size0=256, **attrs):
    from napari_mil.heatmaps import AttentionMap, save_attention

    coords = np.array([[x * 256, y * 256] for y in range(4) for x in range(5)]) if coords is None else coords
    amap = AttentionMap(coords, np.linspace(1, 2, len(coords)) / 30, size0)
    return save_attention(path, amap, {"slide_id": CMU1, "name": CMU1, **attrs})


def test_a_png_too_large_is_refused_before_it_is_made(tmp_path):
    path = attention_file(tmp_path / "att.h5")
    # 1280 x 1024 px at 0.001: 1.3 terapixels. Under a 3 GiB limit: an error, never a MemoryError or a kill
    result = run_cli("export", path, "--out", tmp_path / "x", "--formats", "png", "--downsample", "0.001", memory_gib=3)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "1280000 x 1024000 pixels" in result.stderr and "--max-pixels" in result.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())


def test_max_pixels_sets_the_limit(tmp_path, capsys):
    path = attention_file(tmp_path / "att.h5")
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--formats", "png", "--max-pixels", "100"]) == 1
    assert "40 x 32 pixels" in capsys.readouterr().err
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--formats", "png", "-q"]) == 0


def test_absurd_coordinates_are_refused_not_allocated(tmp_path, capsys):
    from napari_mil.heatmaps import ImageTooLargeError, load_attention

    coords = np.array([[0, 0], [256, 0], [10**8, 10**8]])
    path = attention_file(tmp_path / "far.h5", coords=coords)
    amap, _ = load_attention(path)
    with pytest.raises(ImageTooLargeError, match="is the file damaged"):
        amap.image()  # 390,626 x 390,626 cells: 568 GiB as float32
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--formats", "png"]) == 1
    assert "megapixels, over the limit" in capsys.readouterr().err


def test_top_k_reads_are_sized_first(cmu1_path, tmp_path, capsys):
    path = attention_file(tmp_path / "big.h5", coords=np.array([[0, 0], [512, 0]]), size0=10**6)
    assert main(["export", str(path), "--out", str(tmp_path / "x"), "--formats", "topk", "--slide", str(cmu1_path),
                 "--k", "1"]) == 1
    assert "a top-k patch of 1000000 level-0 px" in capsys.readouterr().err


# ---- 5. silent mismatches --------------------------------------------------------------------
def test_export_refuses_another_slide_than_the_file_names(cmu1_path, synthetic_slide, tmp_path, capsys):
    path = attention_file(tmp_path / "att.h5")
    args = ["export", str(path), "--out", str(tmp_path / "x"), "--formats", "topk", "--k", "2", "-q"]
    assert main([*args, "--slide", str(synthetic_slide.path)]) == 1
    assert "att.h5 is the attention of slide CMU-1-Small-Region, not of slide" in capsys.readouterr().err
    assert main([*args, "--slide", str(synthetic_slide.path), "--force"]) == 0
    assert main([*args, "--slide", str(cmu1_path)]) == 0
    # patches outside the slide: another slide's file, whatever its name says
    outside = attention_file(tmp_path / "outside.h5", coords=np.array([[0, 0], [5000, 5000]]))
    assert main(["export", str(outside), "--out", str(tmp_path / "y"), "--formats", "png", "--slide",
                 str(cmu1_path)]) == 1
    assert "outside CMU-1-Small-Region (2220 x 2967 px)" in capsys.readouterr().err


def test_predict_records_the_slide_in_the_attention_file(cohort):
    root, checkpoint = cohort
    assert predict(root, checkpoint, "a") == 0
    with h5py.File(root / "p" / "attention" / "a.h5") as fh:
        assert fh.attrs["slide_id"] == "a" and fh.attrs["name"] == "a"


def test_extract_with_other_settings_never_returns_the_old_features(cmu1_path, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["extract", str(cmu1_path), "--out", str(out), "--workers", "0"]
    assert main(base) == 0
    assert main(base) == 0 and ", cached," in capsys.readouterr().out
    for options, patch_size in ((["--patch-size", "128"], 128), (["--patch-size", "128", "--min-tissue", "0.9"], 128),
                                (["--magnification", "10"], 256)):
        assert main([*base, *options]) == 0
        said = capsys.readouterr().out
        assert ", extracted," in said and "cached" not in said, options
        bag = FeatureBag.load(feature_path(out, "hne_stats", CMU1))
        with h5py.File(out / "patches" / f"{CMU1}.h5") as fh:
            np.testing.assert_array_equal(bag.coords, fh["coords"][:])
            assert fh["coords"].attrs["patch_size"] == bag.geometry.patch_size == patch_size
        assert main([*base, *options]) == 0 and ", cached," in capsys.readouterr().out  # same settings: reused


def test_the_cache_key_covers_the_whole_geometry(cmu1_path):
    from dataclasses import replace

    from napari_mil.encoders import create_encoder
    from napari_mil.features.store import cache_key
    from napari_mil.slide import open_slide
    from napari_mil.usecases.slide_to_bag import GridSettings, detect, make_grid

    with open_slide(cmu1_path) as slide:
        grid = make_grid(slide, detect(slide), GridSettings())
    hne = create_encoder("hne_stats", device="cpu")
    key = cache_key(cmu1_path, grid, hne, "float16")
    assert key == cache_key(cmu1_path, replace(grid), hne, "float16")
    for change in ({"level0_mpp": 0.25}, {"target_mpp": 1.0}, {"overlap": 16}):
        assert cache_key(cmu1_path, replace(grid, **change), hne, "float16") != key, change


# ---- 6. file-system errors: one line with the path and what to do ----------------------------------
@pytest.fixture
def failing_replace(monkeypatch):
    """``fail(folder, code)``: atomic writes into ``folder`` fail with ``code`` (a read-only folder,
    a full disk), also for root, who may write to read-only folders."""
    real = os.replace

    def fail(folder, code):
        def replace(src, dst, *args, **kwargs):
            if str(dst).startswith(str(folder)):
                raise OSError(code, os.strerror(code), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    return fail


def test_a_read_only_out_with_every_feature_cached(cmu1_path, tmp_path, failing_replace, capsys):
    out = tmp_path / "out"
    args = ["extract", str(cmu1_path), "--out", str(out), "--workers", "0", "-q"]
    assert main(args) == 0
    failing_replace(out, errno.EACCES)
    assert main(args) == 1
    said = errors(capsys)
    assert len(said) == 1 and str(out) in said[0] and "permission denied" in said[0] and "choose another" in said[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_out_is_refused_before_any_work(cmu1_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main(["extract", str(cmu1_path), "--out", str(out), "-q"]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        out.chmod(0o700)


@pytest.mark.parametrize("command", ["tile", "extract", "predict", "export", "train"])
def test_out_naming_a_file(cohort, cmu1_path, command, capsys):
    root, checkpoint = cohort
    taken = root / "taken.txt"
    taken.write_text("not a folder")
    args = {"tile": ["tile", str(cmu1_path)], "extract": ["extract", str(cmu1_path)],
            "predict": ["predict", "a", "--checkpoint", str(checkpoint), "--features", str(root)],
            "export": ["export", str(attention_file(root / "att.h5"))],
            "train": ["train", str(labels_csv(root)), "--features", str(root), "--encoder", ENCODER, "--folds", "2"]}
    assert main([*args[command], "--out", str(taken), "-q"]) in (1, 2)
    said = errors(capsys)
    assert len(said) == 1 and str(taken) in said[0] and "a file is in the way where a folder is needed" in said[0]
    assert taken.read_text() == "not a folder"


def labels_csv(root):
    path = root / "labels.csv"
    path.write_text("slide_id,label\na,0\nb,1\n")
    return path


def test_a_full_disk_while_writing_a_preview(cmu1_path, synthetic_slide, tmp_path, failing_replace, capsys):
    out = tmp_path / "out"
    failing_replace(out / "previews", errno.ENOSPC)
    assert main(["tile", str(cmu1_path), str(synthetic_slide.path), "--out", str(out), "-q"]) == 1
    said = errors(capsys)
    assert len(said) == 2 and all("the disk is full: free some space" in line for line in said)
    assert f"{CMU1}.png" in said[0]
    summary = list(csv.DictReader(open(out / "tiling_summary.csv")))
    assert [bool(r["error"]) for r in summary] == [True, True]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_corrupt_patch_grid(cmu1_path, tmp_path, capsys):
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / f"{CMU1}.h5").write_bytes(b"not an HDF5 file")
    assert main(["extract", str(cmu1_path), "--out", str(tmp_path), "--workers", "0", "-q"]) == 1
    said = errors(capsys)
    assert len(said) == 1 and f"patches/{CMU1}.h5 cannot be read as a patch grid" in said[0]
    assert "delete it to tile the slide again" in said[0]


def test_two_runs_into_one_folder_at_once(cmu1_path, tmp_path):
    """Atomic writes use per-process temporary names: two runs do not rename each other's files."""
    out = tmp_path / "out"
    runs = [subprocess.Popen([sys.executable, "-m", "napari_mil.cli", "tile", str(cmu1_path), "--out", str(out), "-q"],
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait() == 0, run.stderr.read()
    with h5py.File(out / "patches" / f"{CMU1}.h5") as fh:
        assert len(fh["coords"]) > 10
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_export_says_what_is_wrong_with_the_file(tmp_path, capsys):
    from napari_mil.exports import export_attention_file

    assert main(["export", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")]) == 1
    assert f"{tmp_path / 'missing.h5'} does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "is a folder, not a file" in capsys.readouterr().err
    (tmp_path / "text.h5").write_text("hello")
    assert main(["export", str(tmp_path / "text.h5"), "--out", str(tmp_path / "x")]) == 1
    assert "not an attention file" in capsys.readouterr().err
    path = attention_file(tmp_path / "att.h5")
    with pytest.raises(NapariMilError, match="unknown colour map 'rainbow'"):
        export_attention_file(path, tmp_path / "y", colormap="rainbow")
    assert not (tmp_path / "y").exists()  # checked before the GeoJSON and CSV were written


# ---- 7. options: finite and in range at parse time -------------------------------------------------
@pytest.mark.parametrize("args", [
    ["tile", "s.svs", "--magnification", "nan"], ["tile", "s.svs", "--magnification", "inf"],
    ["tile", "s.svs", "--target-mpp", "nan"], ["tile", "s.svs", "--target-mpp", "inf"],
    ["tile", "s.svs", "--target-mpp", "0"], ["tile", "s.svs", "--min-tissue-area", "-1"],
    ["tile", "s.svs", "--min-tissue", "1.5"], ["tile", "s.svs", "--patch-size", "0"], ["tile", "s.svs", "--mpp", "nan"],
    ["tile", "s.svs", "--overlap", "nan"], ["tile", "s.svs", "--saturation-threshold", "300"],
    ["extract", "s.svs", "--batch-size", "0"], ["extract", "s.svs", "--workers", "-1"],
    ["train", "l.csv", "--features", "f", "--folds", "0"], ["train", "l.csv", "--features", "f", "--lr", "nan"],
    ["train", "l.csv", "--features", "f", "--epochs", "0"], ["train", "l.csv", "--features", "f", "--seed", "-1"],
    ["train", "l.csv", "--features", "f", "--mask-ratio-h", "2"], ["train", "l.csv", "--features", "f",
                                                                   "--transmil-dim", "1e3"],
    ["export", "a.h5", "--downsample", "nan"], ["export", "a.h5", "--downsample", "0"], ["export", "a.h5", "--k", "0"],
    ["export", "a.h5", "--max-pixels", "-5"], ["synthetic", "s.tif", "--tumour-burden", "inf"],
])
def test_nonsense_numbers_are_argparse_errors(args, capsys):
    from napari_mil.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*args, "--out", "o"] if args[0] != "synthetic" else args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}: {args[-1]!r} is not a" in err and "Traceback" not in err


def test_the_ranges_are_in_the_help(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    helps = {}
    for command in ("tile", "train", "export", "extract"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        option = None
        for line in capsys.readouterr().out.splitlines():  # an option's help may start on the next line
            if line.strip().startswith("-"):
                option = next(w.rstrip(",") for w in line.split() if w.startswith("--"))
                helps[option] = line
            elif option:
                helps[option] += line
    assert "(> 0; default 20.0)" in helps["--magnification"] and "(0-1; default 0.5)" in helps["--min-tissue"]
    assert "(>= 2; default 5)" in helps["--folds"] and "(> 0; default 0.001)" in helps["--lr"]
    assert "(>= 1; default 250000000)" in helps["--max-pixels"] and "plausible 0.05-20" in helps["--mpp"]
    assert "(0-64)" in helps["--workers"] and "(8-65536; default 256)" in helps["--patch-size"]


def test_a_tiling_csv_with_a_bad_mpp_names_its_line(cmu1_path, tmp_path, capsys):
    table = tmp_path / "slides.csv"
    table.write_text(f"path,mpp\n{cmu1_path},0.5\n{cmu1_path},abc\n")
    assert main(["tile", str(table), "--out", str(tmp_path / "out")]) == 2
    assert "slides.csv line 3: mpp 'abc' is not a number of µm per pixel" in capsys.readouterr().err


def test_a_checkpoint_without_in_dim(cohort, capsys):
    root, checkpoint = cohort
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    del meta["in_dim"]
    checkpoint.with_suffix(".json").write_text(json.dumps(meta))
    assert predict(root, checkpoint, "a") == 1
    assert "abmil_fold0.json has no in_dim" in capsys.readouterr().err


def test_features_stored_as_strings(tmp_path, cohort, capsys):
    root, checkpoint = cohort
    path = feature_path(root, ENCODER, "strings")
    shutil.copy(feature_path(root, ENCODER, "a"), path)
    with h5py.File(path, "r+") as fh:
        del fh["features"]
        fh["features"] = np.full((24, DIM), "0.5", dtype="S3")
    assert predict(root, checkpoint, "strings", "a") == 1
    assert "strings.h5: features are stored as |S3, not numbers" in capsys.readouterr().err
