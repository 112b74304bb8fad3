"""`napari-mil tile`: files, folders and CSVs in; masks, grids, previews out; clear errors."""

import csv
import shutil
import subprocess
import sys

import h5py
import pytest

from napari_mil.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_mil.cli", *map(str, args)], capture_output=True, text=True)


def test_tile_one_slide(cmu1_path, tmp_path):
    result = run_cli("tile", cmu1_path, "--out", tmp_path, "--magnification", "20")
    assert result.returncode == 0, result.stderr
    name = "CMU-1-Small-Region"
    assert (tmp_path / "masks" / f"{name}.png").exists()
    assert (tmp_path / "previews" / f"{name}.png").exists()
    with h5py.File(tmp_path / "patches" / f"{name}.h5") as fh:
        assert fh["coords"].shape[0] > 10
        assert fh["coords"].attrs["patch_size_level0"] == 256
    assert "patches" in result.stdout


def test_folder_and_csv_inputs(synthetic_slide, cmu1_path, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu1_path, folder / "a.svs")
    shutil.copy(synthetic_slide.path, folder / "b.tif")
    (folder / "readme.txt").write_text("not a slide")
    assert main(["tile", str(folder), "--out", str(tmp_path / "out1"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "out1" / "patches").iterdir()) == ["a.h5", "b.h5"]

    table = tmp_path / "slides.csv"
    table.write_text("slide_id,path\nb,slides/b.tif\n")
    assert main(["tile", str(table), "--out", str(tmp_path / "out2"), "--target-mpp", "1.0", "-q"]) == 0
    with h5py.File(tmp_path / "out2" / "patches" / "b.h5") as fh:
        assert fh["coords"].attrs["mpp"] == pytest.approx(1.0)


def test_not_a_slide_is_a_one_line_error_and_others_still_run(cmu1_path, tmp_path):
    bad = tmp_path / "fake.svs"
    bad.write_text("hello")
    result = run_cli("tile", bad, cmu1_path, "--out", tmp_path / "out")
    assert result.returncode == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "fake.svs is not a readable slide" in errors[0]
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "patches" / "CMU-1-Small-Region.h5").exists()
    summary = list(csv.DictReader(open(tmp_path / "out" / "tiling_summary.csv")))
    assert [bool(r["error"]) for r in summary] == [True, False]


def test_missing_mpp_asks_for_the_option(tmp_path, rgb_image, write_tiff):
    path = write_tiff(tmp_path / "nompp.tif", rgb_image, tile=(256, 256))
    result = run_cli("tile", path, "--out", tmp_path / "out")
    assert result.returncode == 1 and "--mpp" in result.stderr
    assert main(["tile", str(path), "--out", str(tmp_path / "out"), "--mpp", "0.25", "--preset", "biopsy", "--patch-size", "64", "-q"]) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mpp", "5000"], "outside the plausible range"),
        (["--magnification", "80"], "finer than the scan"),
        (["--patch-size", "8192"], "more than the slide"),
    ],
)
def test_bad_parameters_are_clear(cmu1_path, tmp_path, args, message):
    result = run_cli("tile", cmu1_path, "--out", tmp_path / "out", *args)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_no_tissue(blank_slide, tmp_path):
    result = run_cli("tile", blank_slide.path, "--out", tmp_path / "out")
    assert result.returncode == 1 and "no tissue" in result.stderr


def test_no_inputs_found(tmp_path):
    result = run_cli("tile", tmp_path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "no slide files" in result.stderr


def test_synthetic_command(tmp_path):
    assert main(["synthetic", str(tmp_path / "s.tif"), "--width", "2048", "--height", "1536"]) == 0
    assert (tmp_path / "s.tif").exists() and (tmp_path / "s.tumour.png").exists()


def test_nonsense_grid_settings_stop_before_any_slide(cmu1_path, tmp_path):
    result = run_cli("tile", cmu1_path, "--out", tmp_path / "out", "--overlap", "-1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "overlap must be in [0, patch size)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_defaults_and_choices_come_from_the_core():
    from napari_mil.cli import build_parser
    from napari_mil.encoders import DEFAULT_ENCODER
    from napari_mil.models import list_models
    from napari_mil.usecases.slide_to_bag import GridSettings

    parser = build_parser()
    tile = parser.parse_args(["tile", "s.svs", "--out", "o"])
    defaults = GridSettings()
    assert (tile.magnification, tile.target_mpp, tile.patch_size, tile.overlap, tile.min_tissue, tile.preset) == (
        defaults.magnification, defaults.target_mpp, defaults.patch_size, defaults.overlap, defaults.min_tissue,
        defaults.preset)
    assert parser.parse_args(["extract", "s.svs", "--out", "o"]).encoder == DEFAULT_ENCODER
    train = ["train", "labels.csv", "--features", "f", "--out", "o"]
    assert parser.parse_args(train).encoder == DEFAULT_ENCODER
    for name in list_models():
        assert parser.parse_args([*train, "--model", name]).model == name
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*train, "--model", "no_such_model"])
    assert exit_.value.code == 2
