"""Tissue detection against synthetic ground truth and on the real CMU-1 slide."""

import numpy as np
import pytest
from PIL import Image

from napari_mil.errors import MissingMppError, NoTissueError
from napari_mil.slide import open_slide
from napari_mil.tissue import PRESETS, TissueMask, _otsu, detect_tissue, require_tissue, segment_tissue


def _resize_mask(mask, shape):
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)) > 127


def test_detection_matches_ground_truth_and_ignores_pen_and_debris(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        mask = detect_tissue(slide)
    truth = _resize_mask(synthetic_slide.tissue_mask(), mask.mask.shape)
    artefacts = _resize_mask(synthetic_slide.artefact_mask(), mask.mask.shape)
    assert artefacts.sum() > 100, "the fixture must contain pen and debris"
    iou = (truth & mask.mask).sum() / (truth | mask.mask).sum()
    assert iou > 0.95
    assert (mask.mask & artefacts).sum() / artefacts.sum() < 0.01
    # mask geometry: 8 µm per mask pixel at 0.25 µm/px = 32 level-0 px
    assert mask.downsample == pytest.approx((32, 32))
    assert mask.mask.shape == (6144 // 32, 8192 // 32)


def test_blank_slide_has_no_tissue(blank_slide):
    with open_slide(blank_slide.path) as slide:
        mask = detect_tissue(slide)
    assert not mask.mask.any()
    with pytest.raises(NoTissueError, match="no tissue found"):
        require_tissue(mask, "blank")


def test_cmu1_tissue_is_found_and_background_is_not(cmu1_path):
    with open_slide(cmu1_path) as slide:
        mask = detect_tissue(slide)
        thumb = np.asarray(Image.fromarray(slide.read_level(0)).resize(mask.mask.shape[::-1], Image.Resampling.BOX))
    assert 0.2 < mask.tissue_area_fraction < 0.5
    bright = thumb.min(axis=2) > 225  # clean glass
    assert (mask.mask & bright).sum() < 0.05 * bright.sum()


def test_presets_scale_with_physical_size():
    """A 96 µm fragment survives the biopsy preset and is dropped by the resection preset;
    at a finer thumbnail scale the same physical fragment gets the same verdict."""
    for pixel_um, scale in [(8.0, 1), (4.0, 2)]:
        img = np.full((400 * scale, 400 * scale, 3), 242, np.uint8)
        img[100 * scale : 300 * scale, 100 * scale : 300 * scale] = (200, 110, 170)  # 1.6 mm
        img[350 * scale : 362 * scale, 20 * scale : 32 * scale] = (200, 110, 170)  # 96 µm
        biopsy = segment_tissue(img, pixel_um, PRESETS["biopsy"])
        resection = segment_tissue(img, pixel_um, PRESETS["resection"])
        assert resection[200 * scale, 200 * scale] and biopsy[200 * scale, 200 * scale]
        assert biopsy[355 * scale, 25 * scale]
        assert not resection[355 * scale, 25 * scale]


def test_holes_small_are_filled_large_lumens_kept():
    img = np.full((300, 300, 3), 242, np.uint8)
    img[20:280, 20:280] = (200, 110, 170)
    img[60:64, 60:64] = 242  # 32 µm hole
    img[120:220, 120:220] = 242  # 800 µm lumen
    mask = segment_tissue(img, 8.0, PRESETS["resection"])
    assert mask[62, 62]
    assert not mask[170, 170]


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(1000, 10), np.full(1000, 120)]).astype(np.uint8)
    t = _otsu(values)
    assert 10 <= t < 120


def test_missing_mpp_stops_detection(tmp_path, rgb_image, write_tiff):
    slide = open_slide(write_tiff(tmp_path / "nompp.tif", rgb_image, tile=(256, 256)))
    with pytest.raises(MissingMppError):
        detect_tissue(slide)


def test_mask_png_round_trip_keeps_the_scale(tmp_path):
    mask = TissueMask(np.eye(5, 7, dtype=bool), (31.5, 32.25))
    path = mask.save(tmp_path / "m.png")
    back = TissueMask.load(path)
    np.testing.assert_array_equal(back.mask, mask.mask)
    assert back.downsample == (31.5, 32.25)
    assert not list(tmp_path.glob("*.tmp"))


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="biopsy"):
        detect_tissue(None, "nonsense")


def test_saturation_of_strong_colours_does_not_overflow():
    """Saturation as colorsys gives it, also where max - min exceeds 128 (pure red, blue pen ink):
    the product with 255 once overflowed 16-bit integers there."""
    import colorsys

    from napari_mil.tissue import hsv_channels

    rng = np.random.default_rng(0)
    pixels = np.concatenate([np.array([[130, 0, 0], [40, 70, 175], [255, 0, 255], [10, 10, 10]], np.uint8),
                             rng.integers(0, 256, (500, 3), dtype=np.uint8)])
    _, sat, val = hsv_channels(pixels[None])
    expected = [int(colorsys.rgb_to_hsv(*(p / 255.0))[1] * 255) for p in pixels.astype(float)]
    assert np.abs(sat[0].astype(int) - np.array(expected)).max() <= 1
    assert sat[0, 0] == 255 and val[0, 0] == 130
