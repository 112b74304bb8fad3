"""Corrupt and oversized slides: the process survives, only the project's errors escape, memory
stays bounded, and the viewer shows an unreadable tile blank with one notification."""

import csv
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_mil.errors import SlideOpenError, SlideReadError
from napari_mil.slide import open_slide
from napari_mil.slide.base import Slide
from napari_mil.slide.tiff_backend import TiffBackend

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """2048 x 1536 px at 0.25 µm/px, 256 px JPEG tiles (8 x 6 at level 0), levels at 1x and 4x."""
    from napari_mil.synthetic import make_synthetic_slide

    folder = tmp_path_factory.mktemp("small")
    return Path(make_synthetic_slide(folder / "small.tif", width=2048, height=1536, mpp=0.25, seed=5, tile=256,
                                     workers=1).path)


def with_value(src: Path, dst: Path, page: int, tag: str, value: int, part: str = "value", index: int = 0) -> Path:
    """A copy of ``src`` with one field of a tag of IFD ``page`` overwritten: its value (the
    ``index``-th of an array), its count or its type."""
    with tifffile.TiffFile(src) as tf:
        t = tf.pages[page].tags[tag]
        count_size = 8 if tf.is_bigtiff else 4
        value_fmt = {3: "H", 16: "Q"}.get(t.dtype, "I")
        at, fmt = {"value": (t.valueoffset + index * struct.calcsize(value_fmt), value_fmt),
                   "count": (t.offset + 4, "Q" if count_size == 8 else "I"), "type": (t.offset + 2, "H")}[part]
        order = tf.byteorder
    data = bytearray(src.read_bytes())
    struct.pack_into(order + fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


def damage_tile(src: Path, dst: Path, page: int, index: int) -> Path:
    """A copy of ``src`` whose tile ``index`` of IFD ``page`` starts with zeros instead of a JPEG header."""
    with tifffile.TiffFile(src) as tf:
        offset = tf.pages[page].dataoffsets[index]
    data = bytearray(src.read_bytes())
    data[offset : offset + 64] = bytes(64)
    dst.write_bytes(bytes(data))
    return dst


# ---- 2. errors after open are the project's ------------------------------------------------------


def test_a_damaged_tile_is_a_read_error_naming_the_slide_and_the_region(small_slide, tmp_path):
    path = damage_tile(small_slide, tmp_path / "damaged.tif", page=0, index=9)  # row 1, column 1
    with open_slide(path) as slide, open_slide(small_slide) as good:
        assert slide.backend.name == "openslide"
        with pytest.raises(SlideReadError, match=r"damaged\.tif: cannot read the region level 0 at \(300, 300\), "
                                                 r"100 x 100 px: OpenSlideError"):
            slide.read_region((300, 300), 0, (100, 100))
        # OpenSlide fails every read after an error on the same handle: the backend replaces it
        np.testing.assert_array_equal(slide.read_region((1024, 1024), 0, (300, 200)),
                                      good.read_region((1024, 1024), 0, (300, 200)))
    fallback = Slide(path, TiffBackend(path), 0.25, "user")
    with pytest.raises(SlideReadError, match=r"damaged\.tif: cannot read the region level 0 at \(300, 300\)"):
        fallback.read_region((300, 300), 0, (100, 100))
    fallback.close()


@pytest.mark.parametrize("tag,part,value", [
    ("TileWidth", "count", 2),  # tifffile: TypeError comparing a tuple
    ("TileLength", "type", 2),  # ValueError: int('')
    ("XResolution", "count", 0),  # ValueError unpacking the resolution
])
def test_the_fallback_turns_what_tifffile_raises_on_open_into_slide_open_errors(small_slide, tmp_path, tag, part,
                                                                               value):
    bad = with_value(small_slide, tmp_path / "bad.tif", 0, tag, value, part=part)
    with pytest.raises(SlideOpenError, match="tifffile"):
        TiffBackend(bad)


# ---- 1. header values that made OpenSlide abort the process ------------------------------------

OPEN_AND_READ = textwrap.dedent("""
    import sys
    from napari_mil.errors import NapariMilError
    from napari_mil.slide import open_slide
    try:
        with open_slide(sys.argv[1]) as slide:
            slide.read_region((0, 0), slide.level_count - 1, (512, 384))
            slide.read_region((0, 0), 0, (2048, 1536))
        print("opened")
    except NapariMilError as exc:
        print(f"{type(exc).__name__}: {exc}")
""")


@pytest.fixture(scope="module")
def small_bigtiff(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("big") / "small_big.tif"
    image = np.clip(rng.normal(200, 20, (1024, 1024, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, image, bigtiff=True, tile=(256, 256), photometric="rgb", compression="jpeg")
    return path


@pytest.mark.parametrize("case", [
    # what the issue found: a 512 x 1,560,281,600 px tile, about 3 TB to allocate
    dict(page=0, tag="TileLength", value=1560281600),
    dict(page=1, tag="TileWidth", value=2**31 - 1),
    dict(page=1, tag="TileByteCounts", value=2**32 - 1),  # 4 GiB of tile data in a 250 kB file
    dict(page=0, tag="TileLength", value=1560281600, bigtiff=True),
])
def test_header_values_openslide_would_die_on_are_refused_at_open(small_slide, small_bigtiff, tmp_path, case):
    """Each mutant is opened in a child process: before the checks, the first two aborted it."""
    src = small_bigtiff if case.get("bigtiff") else small_slide
    bad = with_value(src, tmp_path / "bad.tif", case["page"], case["tag"], case["value"])
    child = subprocess.run([sys.executable, "-c", OPEN_AND_READ, str(bad)], capture_output=True, text=True,
                           env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert child.returncode == 0, f"the process died ({child.returncode}): {child.stderr[-500:]}"
    assert child.stdout.startswith("SlideOpenError: bad.tif is not a readable slide: corrupt TIFF structure"), \
        child.stdout + child.stderr[-500:]


def test_a_batch_goes_on_after_a_slide_that_would_abort(small_slide, cmu1_path, tmp_path):
    bad = with_value(small_slide, tmp_path / "a.tif", 0, "TileLength", 1560281600)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "napari_mil.cli", "tile", str(bad), str(cmu1_path), "--out", str(out)],
                         capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=300)
    assert run.returncode == 1, run.stderr[-800:]
    rows = list(csv.DictReader(open(out / "tiling_summary.csv")))
    assert [Path(r["slide"]).name for r in rows] == ["a.tif", cmu1_path.name]
    assert "corrupt TIFF structure" in rows[0]["error"] and "tiles" in rows[0]["error"]
    assert rows[1]["error"] == "" and int(rows[1]["patches"]) > 10
