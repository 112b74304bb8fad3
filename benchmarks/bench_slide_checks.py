"""What the TIFF structure checks add to opening a good slide.

    .venv/bin/python benchmarks/bench_slide_checks.py [--repeats 40]

``open_slide`` parses every image directory of a TIFF (tile sizes, tile tables against the file
size) before OpenSlide or tifffile reads it. This times ``open_slide`` with the checks and with
them switched off, back to back in alternating order so that both see the same page cache and
load, on the real CMU-1 slide and on the synthetic 51,200 x 40,960 px JPEG slide of
bench_slide_to_tiles.py (written once to benchmarks/.cache/). It prints the median of the paired
ratios (target < 1.1) beside the ratio of the medians, and writes
benchmarks/results/slide_checks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_slide_to_tiles import RESULTS, benchmark_slide, machine  # noqa: E402


def time_open(path: Path, repeats: int) -> dict:
    from napari_mil.slide import opening
    from napari_mil.slide.tiff_header import check_tiff_header

    def once(checked: bool) -> float:
        opening.check_tiff_header = check_tiff_header if checked else (lambda path: None)
        t = time.perf_counter()
        opening.open_slide(path).close()
        return time.perf_counter() - t

    try:
        for checked in (True, False):  # warm the page cache and the imports
            once(checked)
        with_checks, without = [], []
        for i in range(repeats):
            for checked in ((True, False) if i % 2 else (False, True)):
                (with_checks if checked else without).append(once(checked))
    finally:
        opening.check_tiff_header = check_tiff_header
    checks_alone = []
    for _ in range(repeats):
        opening.open_slide(path).close()  # as in use: the check runs after other work, not in a hot loop
        t = time.perf_counter()
        check_tiff_header(path)
        checks_alone.append(time.perf_counter() - t)
    med_with, med_without = statistics.median(with_checks), statistics.median(without)
    # each pair ran back to back, so its ratio is the least disturbed by other load on the machine
    paired = statistics.median(a / b for a, b in zip(with_checks, without))
    return {"slide": path.name, "size_bytes": path.stat().st_size, "repeats": repeats,
            "open_with_checks_ms": round(med_with * 1e3, 3), "open_without_checks_ms": round(med_without * 1e3, 3),
            "checks_alone_ms": round(statistics.median(checks_alone) * 1e3, 3),
            "ratio_of_medians": round(med_with / med_without, 3), "ratio": round(paired, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--size", default="51200x40960", help="the large slide's width x height")
    args = ap.parse_args()
    from napari_mil.paths import CMU1_PATH

    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    for path in (CMU1_PATH, benchmark_slide(width, height)):
        row = time_open(path, args.repeats)
        rows.append(row)
        print(f"{row['slide']}: open_slide {row['open_with_checks_ms']:.2f} ms with the checks, "
              f"{row['open_without_checks_ms']:.2f} ms without (medians of {args.repeats}); ratio {row['ratio']:.3f} "
              f"(median of paired runs; of the medians {row['ratio_of_medians']:.3f}; target < 1.1); "
              f"the checks alone {row['checks_alone_ms']:.3f} ms")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slide_checks.json").write_text(json.dumps({"machine": machine(), "slides": rows}, indent=2))


if __name__ == "__main__":
    main()
