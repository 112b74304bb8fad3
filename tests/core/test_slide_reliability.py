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

from napari_mil.errors import MemoryCapError, SlideOpenError, SlideReadError
from napari_mil.slide import open_slide
from napari_mil.slide.base import Slide
from napari_mil.slide.pyramid import dask_pyramid
from napari_mil.slide.tiff_backend import TiffBackend
from napari_mil.tissue import detect_tissue

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())  # the repository
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


# ---- 3. tissue detection in bounded memory --------------------------------------------------------


def _spy_reads(slide: Slide, monkeypatch) -> list:
    """Record the size of every region read; fail any read of more than 4.2 Mpx (2048 x 2048)."""
    sizes, read = [], slide.read_region

    def spy(location, level, size):
        sizes.append(size)
        assert size[0] * size[1] <= 2048 * 2048, f"a {size[0]} x {size[1]} px read"
        return read(location, level, size)

    monkeypatch.setattr(slide, "read_region", spy)
    return sizes


def test_a_single_level_slide_is_detected_region_by_region(tmp_path, monkeypatch):
    """8192 x 8192 px and no pyramid: the thumbnail is built from 2048 px regions, never the
    whole level (which for 30,000 px a side ran out of memory)."""
    tile, n = 512, 8192
    glass, tissue = np.full((tile, tile, 3), 243, np.uint8), np.full((tile, tile, 3), (200, 110, 170), np.uint8)
    tiles = (tissue if 5 <= ty < 11 and 5 <= tx < 11 else glass for ty in range(n // tile) for tx in range(n // tile))
    path = tmp_path / "single.tif"
    tifffile.imwrite(path, tiles, shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", resolution=(4e4, 4e4), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.level_count == 1 and slide.mpp == pytest.approx(0.25)
        sizes = _spy_reads(slide, monkeypatch)
        mask = detect_tissue(slide)
    assert len(sizes) == 16
    assert mask.mask.shape == (256, 256)
    assert mask.tissue_area_fraction == pytest.approx(36 / 256, abs=0.01)
    assert mask.mask[128, 128] and not mask.mask[20, 20]


def _tall_tiff(path: Path, height: int, mpp: float) -> Path:
    """A valid 512 px wide tiled JPEG TIFF of ``height`` rows in a few kB: every tile entry points
    at the same JPEG tile."""
    import imagecodecs

    jpeg = imagecodecs.jpeg8_encode(np.full((512, 512, 3), 240, np.uint8), level=80, colorspace="RGB",
                                    outcolorspace="RGB")
    n = -(-height // 512)
    res = (round(1e4 / mpp), 1)  # pixels per centimetre
    tags = [(256, 4, 1, 512), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 7), (262, 3, 1, 2),
            (277, 3, 1, 3), (282, 5, 1, None), (283, 5, 1, None), (284, 3, 1, 1), (296, 3, 1, 3),
            (322, 3, 1, 512), (323, 3, 1, 512), (324, 4, n, None), (325, 4, n, None)]
    ifd_size = 2 + 12 * len(tags) + 4
    extra_at = 8 + ifd_size
    arrays = {258: struct.pack("<3H", 8, 8, 8), 282: struct.pack("<2I", *res), 283: struct.pack("<2I", *res)}
    data_at = extra_at + sum(len(v) for v in arrays.values()) + 8 * n
    arrays[324] = struct.pack(f"<{n}I", *([data_at] * n))
    arrays[325] = struct.pack(f"<{n}I", *([len(jpeg)] * n))
    out, extra, positions = bytearray(b"II*\x00" + struct.pack("<I", 8)), bytearray(), {}
    for tag in (258, 282, 283, 324, 325):
        positions[tag] = extra_at + len(extra)
        extra += arrays[tag]
    out += struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        field = struct.pack("<I", positions[tag]) if value is None else struct.pack("<HH" if typ == 3 else "<I",
                                                                                   *((value, 0) if typ == 3 else (value,)))
        out += struct.pack("<HHI", tag, typ, count) + field
    out += struct.pack("<I", 0) + extra + jpeg
    path.write_bytes(bytes(out))
    return path


def test_a_huge_thumbnail_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """3.4 million rows at 2 µm/px: the 8 µm/px thumbnail alone would be 108 Mpx (4 GiB to segment);
    the whole level, which tissue detection used to read at once, 7 GB of RGBA."""
    path = _tall_tiff(tmp_path / "tall.tif", 3_400_000, mpp=2.0)
    assert path.stat().st_size < 200_000
    with open_slide(path) as slide:
        assert slide.dimensions == (512, 3_400_000) and slide.mpp == pytest.approx(2.0)
        sizes = _spy_reads(slide, monkeypatch)
        with pytest.raises(MemoryCapError, match=r"128 x 850000 px .* above max_pixels=50,000,000.*raise max_pixels"):
            detect_tissue(slide)
        assert sizes == []
        with pytest.raises(MemoryCapError, match="max_pixels=1,000;"):  # the cap is a parameter
            detect_tissue(slide, max_pixels=1_000)


# ---- 4. the viewer: a blank tile and one notification, not a dead layer ------------------------


def test_an_unreadable_tile_becomes_blank_and_is_reported(small_slide, tmp_path):
    path = damage_tile(small_slide, tmp_path / "damaged.tif", page=0, index=9)
    errors = []
    with open_slide(path) as slide, open_slide(small_slide) as good:
        level0 = dask_pyramid(slide, on_error=errors.append)[0]
        bad_tile = np.asarray(level0[256:512, 256:512])
        assert (bad_tile == 255).all()
        assert len(errors) == 1 and isinstance(errors[0], SlideReadError) and "damaged.tif" in str(errors[0])
        np.testing.assert_array_equal(np.asarray(level0[512:1024, 512:1024]),
                                      good.read_region((512, 512), 0, (512, 512)))
        with pytest.raises(SlideReadError):  # without a callback the error is the caller's
            np.asarray(dask_pyramid(slide)[0][256:512, 256:512])


def test_the_viewer_layer_notifies_once_per_slide(small_slide, tmp_path, monkeypatch):
    import napari.utils.notifications

    from napari_mil._napari._layers import slide_layer_data

    shown = []
    monkeypatch.setattr(napari.utils.notifications, "show_warning", shown.append)
    path = damage_tile(small_slide, tmp_path / "damaged.tif", page=0, index=9)
    path = damage_tile(path, path, page=0, index=10)
    with open_slide(path) as slide:
        data, kwargs, kind = slide_layer_data(slide)
        for _ in range(3):  # napari asks again as the view moves: still one notification
            view = np.asarray(data[0][0:768, 0:768])
        assert (view[256:512, 256:768] == 255).all() and view[:256].std() > 0
    assert len(shown) == 1
    assert "damaged.tif" in shown[0] and "shown blank" in shown[0]
