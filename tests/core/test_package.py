"""The package: light import, the manifest at the top level and inside the installed package."""

import importlib
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_import_pulls_neither_torch_nor_qt():
    code = (
        "import sys, napari_mil, napari_mil.slide, napari_mil.tissue, napari_mil.tiling, napari_mil.synthetic;"
        "heavy = [m for m in ('torch', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari', 'magicgui') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the core pulled in {out.stdout.strip()}"


def test_import_does_not_touch_the_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import napari_mil, napari_mil.cli, napari_mil.slide, napari_mil.tiling\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_core_modules_never_import_qt():
    core = [p for p in (ROOT / "napari_mil").rglob("*.py") if "_napari" not in p.parts]
    for path in core:
        text = path.read_text()
        for qt in ("qtpy", "PyQt5", "PyQt6", "PySide", "magicgui", "napari.qt", "superqt"):
            assert f"import {qt}" not in text and f"from {qt}" not in text, f"{path.name} imports {qt}"


def test_top_level_manifest_is_the_shipped_one():
    top = ROOT / "napari.yaml"
    shipped = ROOT / "napari_mil" / "napari.yaml"
    assert top.read_text() == shipped.read_text()


def test_installed_manifest_validates_and_every_command_imports():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-mil")
    manifest.validate_imports()  # raises when a python_name cannot be imported
    raw = yaml.safe_load((ROOT / "napari.yaml").read_text())
    ids = {c["id"] for c in raw["contributions"]["commands"]}
    assert {c.id for c in manifest.contributions.commands} == ids
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
    out = subprocess.run([Path(sys.executable).with_name("npe2"), "validate", "napari-mil"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reader_patterns_cover_the_openslide_formats():
    from napari_mil.slide.base import OPENSLIDE_EXTENSIONS

    raw = yaml.safe_load((ROOT / "napari.yaml").read_text())
    patterns = raw["contributions"]["readers"][0]["filename_patterns"]
    for ext in OPENSLIDE_EXTENSIONS:
        assert f"*{ext}" in patterns


def test_built_wheel_ships_the_manifest(tmp_path):
    """The wheel carries napari.yaml inside the package and points napari at it."""
    import zipfile

    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("napari_mil-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_mil/napari.yaml" in names
        assert "napari_mil/data/CMU-1-Small-Region.svs" in names
        entry_points = zf.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        manifest = yaml.safe_load(zf.read("napari_mil/napari.yaml"))
    assert "napari-mil = napari_mil:napari.yaml" in entry_points
    assert manifest["name"] == "napari-mil"


def test_reader_patterns_and_file_dialog_list_the_extensions_the_reader_opens():
    """One list of slide extensions: the manifest's reader patterns and the Slide dock's file
    filter are SLIDE_FILE_PATTERNS, which covers every extension ``is_slide_path`` accepts."""
    from napari_mil.slide.base import SLIDE_EXTENSIONS, SLIDE_FILE_PATTERNS, is_slide_path

    raw = yaml.safe_load((ROOT / "napari.yaml").read_text())
    readers = raw["contributions"]["readers"]
    assert len(readers) == 1
    assert set(readers[0]["filename_patterns"]) == set(SLIDE_FILE_PATTERNS)
    assert all(any(f"slide{ext}".endswith(p[1:]) for p in SLIDE_FILE_PATTERNS) for ext in SLIDE_EXTENSIONS)
    assert all(is_slide_path(f"slide{p[1:]}") for p in SLIDE_FILE_PATTERNS)
