"""Opening slides: OpenSlide and the tifffile fallback, mpp handling, and bad files."""

import numpy as np
import pytest

from napari_mil.errors import InvalidMppError, MissingMppError, SlideOpenError
from napari_mil.slide import open_slide
from napari_mil.slide.pyramid import dask_pyramid
from napari_mil.slide.tiff_backend import TiffBackend


def test_cmu1_is_read_with_its_metadata(cmu1_path):
    with open_slide(cmu1_path) as slide:
        assert slide.backend.name == "openslide"
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "slide"
        assert slide.magnification == 20
        assert slide.properties["openslide.vendor"] == "aperio"
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        assert slide.associated_images["macro"].shape[2] == 3
        region = slide.read_region((1000, 1000), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        assert region.std() > 5  # tissue, not a flat fill


def test_synthetic_slide_is_a_pyramid_that_openslide_reads(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        assert slide.backend.name == "openslide"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.magnification == pytest.approx(40)
        assert slide.level_downsamples == [1.0, 4.0, 16.0]
        assert slide.tile_sizes[0] == (512, 512)


def test_tifffile_backend_matches_openslide_pixels(synthetic_slide):
    """The fallback decodes the same JPEG tiles as OpenSlide, so regions agree."""
    from pathlib import Path

    with open_slide(synthetic_slide.path) as slide:
        fallback = TiffBackend(Path(synthetic_slide.path))
        for level, location, size in [(0, (3000, 2500), (700, 300)), (1, (4000, 4000), (200, 150)), (2, (0, 0), (512, 384))]:
            a = slide.read_region(location, level, size).astype(int)
            b = fallback.read_region(location, level, size).astype(int)
            assert a.shape == b.shape
            assert np.abs(a - b).mean() < 1.5, f"level {level} differs"
        assert fallback.recorded_mpp == pytest.approx(0.25)
        fallback.close()


def test_untiled_tiff_opens_through_the_fallback(tmp_path, rgb_image, write_tiff):
    path = write_tiff(tmp_path / "plain.tif", rgb_image, resolution=1e4 / 0.5, unit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend.name == "tifffile"
        assert slide.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(slide.read_region((150, 90), 0, (100, 50)), rgb_image[90:140, 150:250])
        # regions past the edge are padded with white, like OpenSlide's transparent background
        edge = slide.read_region((750, 550), 0, (100, 100))
        assert (edge[50:, :] == 255).all() and (edge[:50, :50] == rgb_image[550:, 750:]).all()


def test_ome_tiff_mpp_comes_from_physical_size(tmp_path, rgb_image):
    import tifffile

    path = tmp_path / "image.ome.tif"
    tifffile.imwrite(path, rgb_image, photometric="rgb", metadata={"PhysicalSizeX": 0.345, "PhysicalSizeY": 0.345, "axes": "YXS"})
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(0.345)
        assert slide.dimensions == (800, 600)


def test_missing_mpp_is_asked_for_never_divided_by(tmp_path, rgb_image, write_tiff):
    path = write_tiff(tmp_path / "nompp.tif", rgb_image, tile=(256, 256))
    slide = open_slide(path)
    assert slide.mpp is None and slide.mpp_source == "missing"
    assert slide.magnification is None
    with pytest.raises(MissingMppError, match="--mpp"):
        slide.require_mpp()
    given = open_slide(path, mpp=0.5)
    assert given.mpp == 0.5 and given.mpp_source == "user"


def test_absurd_recorded_mpp_is_treated_as_missing(tmp_path, rgb_image, write_tiff):
    # 72 dpi, the default of many image editors: 352 µm per pixel
    path = write_tiff(tmp_path / "dpi.tif", rgb_image, tile=(256, 256), resolution=72, unit="INCH")
    slide = open_slide(path)
    assert slide.mpp is None
    with pytest.raises(MissingMppError, match="outside the plausible range"):
        slide.require_mpp()


@pytest.mark.parametrize("mpp", [0.0, -1, 1e4, float("nan"), "abc"])
def test_absurd_given_mpp_is_refused(tmp_path, rgb_image, mpp, write_tiff):
    path = write_tiff(tmp_path / "x.tif", rgb_image)
    with pytest.raises(InvalidMppError):
        open_slide(path, mpp=mpp)


def test_a_text_file_is_not_a_slide(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n" * 100)
    with pytest.raises(SlideOpenError, match="notes.svs is not a readable slide"):
        open_slide(path)


def test_unsupported_format(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(SlideOpenError, match="unsupported format"):
        open_slide(path)


def test_missing_file(tmp_path):
    with pytest.raises(SlideOpenError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_tiff_is_rejected_at_open(tmp_path, synthetic_slide, keep):
    data = open(synthetic_slide.path, "rb").read()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideOpenError):
        open_slide(path)


def test_corrupt_tiles_are_rejected_at_open(tmp_path, synthetic_slide):
    data = bytearray(open(synthetic_slide.path, "rb").read())
    rng = np.random.default_rng(0)
    # scramble the image data of the lowest levels, written last, but keep the headers
    start = int(len(data) * 0.97)
    data[start:-4096] = rng.integers(0, 256, len(data) - 4096 - start, dtype=np.uint8).tobytes()
    path = tmp_path / "corrupt.tif"
    path.write_bytes(bytes(data))
    with pytest.raises(SlideOpenError):
        open_slide(path)


def test_dask_pyramid_chunks_follow_the_tiles(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        levels = dask_pyramid(slide)
        assert [lv.shape[:2] for lv in levels] == [(h, w) for w, h in slide.level_dimensions]
        for level, arr in enumerate(levels):
            th, tw = slide.tile_sizes[level]
            assert arr.chunks[0][0] == th and arr.chunks[1][0] == tw
            assert all(c == th for c in arr.chunks[0][:-1]) and all(c == tw for c in arr.chunks[1][:-1])
        # an unaligned read through dask equals the direct read
        got = np.asarray(levels[0][1000:1700, 2100:2350])
        np.testing.assert_array_equal(got, slide.read_region((2100, 1000), 0, (250, 700)))
        got = np.asarray(levels[1][100:400, 300:500])
        np.testing.assert_array_equal(got, slide.read_region((1200, 400), 1, (200, 300)))
