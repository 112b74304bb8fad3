"""Slide-to-tiles benchmark: tissue detection + grid, layer reads, and open-to-first-frame.

    .venv/bin/python benchmarks/bench_slide_to_tiles.py [--size 51200x40960] [--quick]

It writes (once, cached in benchmarks/.cache/) a synthetic 40x slide of at least 50k x 40k
pixels at 0.25 µm/px, then measures, each against a reference timed in the same run:

1. tissue detection + 20x/256 px patch grid, against a naive reference that loops over every
   candidate patch reading level 0 and thresholding its saturation;
2. tiles per second through the napari multiscale layer's dask arrays (viewport-sized reads,
   as napari requests them), against raw OpenSlide ``read_region`` on the same tiles;
3. the time from ``viewer.open`` to the first drawn frame in napari (under Xvfb when there is
   no display), beside the time of a plain ``read_region`` of the same view.

Results are printed and written to benchmarks/results/slide_to_tiles.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def benchmark_slide(width: int, height: int) -> Path:
    from napari_mil.synthetic import make_synthetic_slide

    path = CACHE / f"bench_{width}x{height}.tif"
    if not (path.exists() and path.with_suffix(".json").exists()):
        print(f"generating {width} x {height} benchmark slide (once)...", flush=True)
        t = time.perf_counter()
        make_synthetic_slide(path, width=width, height=height, mpp=0.25, seed=2024, tumour_burden=0.1,
                             tissue_pieces=2, pen_marks=True, debris=True)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return path


# ---- 1. tissue detection + grid ------------------------------------------------------------
def fast_detect_and_tile(path: Path):
    from napari_mil.slide import open_slide
    from napari_mil.tiling import make_patch_grid
    from napari_mil.tissue import detect_tissue

    t = time.perf_counter()
    with open_slide(path) as slide:
        mask = detect_tissue(slide)
        grid = make_patch_grid(slide, mask, patch_size=256, magnification=20, min_tissue=0.5)
    return time.perf_counter() - t, grid, mask


def naive_detect_and_tile(path: Path, saturation_threshold: int):
    """The straightforward way: every candidate 20x patch read at level 0 and thresholded."""
    import openslide

    from napari_mil.tissue import hsv_channels

    t = time.perf_counter()
    slide = openslide.OpenSlide(str(path))
    w, h = slide.dimensions
    size0 = 512  # 256 px at 20x on a 40x scan
    kept = []
    for y in range(0, h - size0 + 1, size0):
        for x in range(0, w - size0 + 1, size0):
            rgb = np.asarray(slide.read_region((x, y), 0, (size0, size0)))[..., :3]
            _, sat, val = hsv_channels(rgb)
            if ((sat > saturation_threshold) & (val > 40)).mean() >= 0.5:
                kept.append((x, y))
    slide.close()
    return time.perf_counter() - t, np.array(kept)


def bench_tiling(path: Path, repeats: int, naive: bool) -> dict:
    from napari_mil.slide import open_slide
    from napari_mil.tissue import _otsu, hsv_channels, read_thumbnail

    cold, grid, mask = fast_detect_and_tile(path)
    warm = [fast_detect_and_tile(path)[0] for _ in range(repeats)]
    out = {
        "patches": len(grid),
        "tissue_fraction": round(mask.tissue_area_fraction, 4),
        "fast_cold_s": round(cold, 3),
        "fast_warm_median_s": round(statistics.median(warm), 3),
        "fast_warm_runs_s": [round(v, 3) for v in warm],
    }
    if naive:
        with open_slide(path) as slide:
            thumb, _ = read_thumbnail(slide, 8.0)
        _, sat, _ = hsv_channels(thumb)
        threshold = max(_otsu(sat), 15)
        naive_s, kept = naive_detect_and_tile(path, threshold)
        fast = {tuple(c) for c in grid.coords.tolist()}
        slow = {tuple(c) for c in kept.tolist()}
        out.update({
            "naive_s": round(naive_s, 2),
            "naive_patches": len(kept),
            "speedup_vs_naive": round(naive_s / statistics.median(warm), 1),
            "patch_set_jaccard_vs_naive": round(len(fast & slow) / max(len(fast | slow), 1), 3),
        })
    return out


# ---- 2. layer reads ------------------------------------------------------------------------
def bench_layer_reads(path: Path, viewports: int, view=(1024, 1536)) -> dict:
    """Viewport reads through the napari layer's dask pyramid vs raw read_region per tile.

    Both paths get their own OpenSlide handle (own tile cache) and read the same tiles; the
    order of the two alternates between rounds so neither profits from the other's warm-up.
    """
    import napari.layers
    import openslide

    from napari_mil._napari._reader import read_slides

    data, kwargs, _ = read_slides(str(path))[0]
    layer = napari.layers.Image(data, **kwargs)
    level0 = layer.data[0] if layer.multiscale else layer.data
    raw = openslide.OpenSlide(str(path))
    th, tw = level0.chunksize[:2]
    H, W = level0.shape[:2]
    vh, vw = view
    rng = np.random.default_rng(1)
    views = [(int(rng.integers(0, H - vh)), int(rng.integers(0, W - vw))) for _ in range(viewports)]

    def tiles(y, x):
        return [(ty, tx) for ty in range(y // th, (y + vh - 1) // th + 1) for tx in range(x // tw, (x + vw - 1) // tw + 1)]

    def raw_pass(chunk):
        n = 0
        t = time.perf_counter()
        for y, x in chunk:
            for ty, tx in tiles(y, x):
                np.asarray(raw.read_region((tx * tw, ty * th), 0, (tw, th)))[..., :3]
                n += 1
        return n, time.perf_counter() - t

    def layer_pass(chunk):
        n = sum(len(tiles(y, x)) for y, x in chunk)
        t = time.perf_counter()
        for y, x in chunk:
            np.asarray(level0[y : y + vh, x : x + vw])
        return n, time.perf_counter() - t

    rounds = 8
    per = max(1, len(views) // rounds)
    raw_n = raw_t = lay_n = lay_t = 0.0
    for r in range(rounds):
        chunk = views[r * per : (r + 1) * per]
        first, second = (raw_pass, layer_pass) if r % 2 == 0 else (layer_pass, raw_pass)
        for fn in (first, second):
            n, t = fn(chunk)
            if fn is raw_pass:
                raw_n, raw_t = raw_n + n, raw_t + t
            else:
                lay_n, lay_t = lay_n + n, lay_t + t
    raw.close()
    return {
        "viewport_px": list(view),
        "tile_px": [int(th), int(tw)],
        "tiles_read": int(raw_n),
        "raw_tiles_per_s": round(raw_n / raw_t, 1),
        "layer_tiles_per_s": round(lay_n / lay_t, 1),
        "ratio_layer_to_raw": round((lay_n / lay_t) / (raw_n / raw_t), 3),
    }


# ---- 3. first frame ------------------------------------------------------------------------
FIRST_FRAME_CHILD = r"""
import json, sys, time
import numpy as np
import napari
from qtpy.QtWidgets import QApplication
path = sys.argv[1]
viewer = napari.Viewer(show=True)
viewer.window.resize(1600, 1000)
QApplication.processEvents()
canvas = viewer.window._qt_viewer.canvas._scene_canvas
draws, inserted = [], []
canvas.events.draw.connect(lambda e: draws.append(time.perf_counter()))
viewer.layers.events.inserted.connect(lambda e: inserted.append(time.perf_counter()))

def open_and_draw():
    del draws[:], inserted[:]
    t0 = time.perf_counter()
    viewer.open(path, plugin="napari-mil")
    while not [d for d in draws if inserted and d >= inserted[0]] and time.perf_counter() - t0 < 60:
        QApplication.processEvents()
    first = min(d for d in draws if d >= inserted[0])
    shot = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3]
    return round(inserted[0] - t0, 3), round(first - t0, 3), bool(shot.std() > 10)

cold_layer, cold_frame, cold_ok = open_and_draw()   # first slide of the session: imports included
viewer.layers.clear()
QApplication.processEvents()
warm_layer, warm_frame, warm_ok = open_and_draw()
import openslide
s = openslide.OpenSlide(path)
level = s.get_best_level_for_downsample(max(s.dimensions) / 1600)
t = time.perf_counter()
s.read_region((0, 0), level, s.level_dimensions[level])
t_read = time.perf_counter() - t
print(json.dumps({"first_open_to_layer_s": cold_layer, "first_open_to_frame_s": cold_frame,
                  "again_open_to_layer_s": warm_layer, "again_open_to_frame_s": warm_frame,
                  "frames_not_blank": cold_ok and warm_ok,
                  "reference_read_of_the_displayed_level_s": round(t_read, 3)}))
viewer.close()
"""


def bench_first_frame(path: Path) -> dict:
    cmd = [sys.executable, "-c", FIRST_FRAME_CHILD, str(path)]
    if not os.environ.get("DISPLAY"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="51200x40960", help="benchmark slide WIDTHxHEIGHT (level 0)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--viewports", type=int, default=80)
    parser.add_argument("--quick", action="store_true", help="skip the naive reference (about a minute)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    path = benchmark_slide(width, height)
    results = {"machine": machine(), "slide": {"width": width, "height": height, "mpp": 0.25, "tile": 512}}
    print(f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores)")

    results["tissue_and_grid"] = r = bench_tiling(path, args.repeats, naive=not args.quick)
    print(f"[1] tissue detection + 20x/256px grid: {r['fast_warm_median_s']:.2f} s median "
          f"(cold {r['fast_cold_s']:.2f} s), {r['patches']} patches")
    if "naive_s" in r:
        print(f"    naive per-patch level-0 reference: {r['naive_s']:.1f} s -> {r['speedup_vs_naive']}x faster; "
              f"patch sets agree (Jaccard) {r['patch_set_jaccard_vs_naive']}")

    results["layer_reads"] = r = bench_layer_reads(path, args.viewports)
    print(f"[2] napari layer reads: {r['layer_tiles_per_s']} tiles/s vs raw read_region {r['raw_tiles_per_s']} tiles/s "
          f"-> ratio {r['ratio_layer_to_raw']} ({r['tile_px'][0]} px tiles)")
    from napari_mil.paths import CMU1_PATH

    results["layer_reads_cmu1"] = r = bench_layer_reads(CMU1_PATH, args.viewports, view=(768, 1024))
    print(f"    on the real CMU-1 slide: {r['layer_tiles_per_s']} vs {r['raw_tiles_per_s']} tiles/s "
          f"-> ratio {r['ratio_layer_to_raw']} ({r['tile_px'][0]} px tiles)")

    results["first_frame"] = r = bench_first_frame(path)
    if "error" in r:
        print(f"[3] first frame: failed: {r['error']}")
    else:
        print(f"[3] viewer.open -> first frame: {r['first_open_to_frame_s']:.2f} s for the session's first slide "
              f"(imports included), {r['again_open_to_frame_s']:.2f} s when opened again; a plain OpenSlide read of "
              f"the level napari shows takes {r['reference_read_of_the_displayed_level_s']:.2f} s; "
              f"frames not blank: {r['frames_not_blank']}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "slide_to_tiles.json").write_text(json.dumps(results, indent=2))
    print(f"written {RESULTS / 'slide_to_tiles.json'}")


if __name__ == "__main__":
    main()
