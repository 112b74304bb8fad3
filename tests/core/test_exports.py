"""Exports without the viewer: the colour maps ship with the package and match napari's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_mil.errors import NapariMilError
from napari_mil.exports import COLORMAPS, colormap_lut


@pytest.mark.parametrize("name", COLORMAPS)
def test_bundled_colour_maps_are_napari_s(name):
    from napari.utils.colormaps import ensure_colormap

    napari_lut = (ensure_colormap(name).map(np.linspace(0, 1, 256)) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(colormap_lut(name), napari_lut)


def test_an_unknown_colour_map_is_a_clear_error():
    with pytest.raises(NapariMilError, match="unknown colour map 'rainbow'.*inferno"):
        colormap_lut("rainbow")


def test_a_png_export_needs_no_napari(tmp_path):
    """``napari-mil export`` on a machine without napari: importing it is made to fail."""
    code = f"""
import sys
sys.modules["napari"] = None  # any `import napari...` now raises ImportError
import numpy as np
from napari_mil.exports import export_overlay_png
from napari_mil.heatmaps import AttentionMap
coords = np.array([[x * 256, y * 256] for y in range(4) for x in range(5)])
amap = AttentionMap(coords, np.linspace(1, 2, len(coords)) / 30, 256)
path = export_overlay_png({str(tmp_path / 'map.png')!r}, amap, (1280, 1024), 32.0, colormap="viridis")
print(path)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(tmp_path / "map.png") as png:
        pixels = np.asarray(png.convert("RGBA"))
    assert pixels.shape == (32, 40, 4)
    assert (pixels[..., 3] > 0).any()
