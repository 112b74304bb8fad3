"""Event-loop stalls: how long napari's event loop is blocked while the docks tile, extract and train.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_event_loop.py  # about 3 minutes

(On a desktop, drop the xvfb-run part.) Options (defaults): --epochs 15 (the demo's) --idle 3
(seconds of idle reference before and after) --cached (reuse the demo's cache instead of a fresh
one) --out event_loop.json.

Protocol. A 10 ms precise QTimer ticks on napari's GUI thread for the whole run, inside the real
Qt event loop (`app.exec`), and every tick's time is recorded; a stall is the gap between two
ticks (10 ms when nothing blocks the loop). The work is the teaching demo's chain of dock actions
in a 1,600 x 1,000 viewer, each started by the previous one's worker: open the held-out synthetic
slide, detect tissue, tile, extract its features (Features dock), generate the 16-slide cohort
(a separate process), extract the cohort's features and train MHIM-MIL ABMIL with live curves
and the teacher | student maps redrawn after every epoch (Retrain and Compare docks), then show
the final comparison. By default the demo's cache is a fresh folder, so every extraction really
runs. Phases come from the demo's own marks; the idle seconds before the start and after the
end are the reference (the same loop with nothing to do). Per phase: ticks, the longest gap, the
99th percentile, and the number of gaps over 100 ms (the target is none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def phase_stats(ticks: np.ndarray, start: float, end: float) -> dict:
    inside = ticks[(ticks >= start) & (ticks <= end)]
    gaps = np.diff(inside) * 1e3
    if len(gaps) == 0:
        return {"seconds": round(end - start, 2), "ticks": len(inside)}
    worst = int(np.argmax(gaps))
    return {"seconds": round(end - start, 2), "ticks": len(inside), "longest_gap_ms": round(float(gaps.max()), 1),
            "longest_at_s": round(float(inside[worst] - start), 2), "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
            "median_gap_ms": round(float(np.median(gaps)), 1), "gaps_over_100ms": int((gaps > 100).sum())}


class StallWatch:
    """--diagnose: a thread that, when the GUI thread has not ticked for 80 ms, records where the
    GUI thread is (its innermost frames in this project and napari), to say what stalled."""

    def __init__(self, ticks: list, main_thread_id: int):
        import threading

        self.ticks, self.main, self.seen, self.reports = ticks, main_thread_id, set(), []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        import traceback

        while not self.stop.wait(0.02):
            if not self.ticks or time.perf_counter() - self.ticks[-1] < 0.08 or self.ticks[-1] in self.seen:
                continue
            self.seen.add(self.ticks[-1])
            frame = sys._current_frames().get(self.main)
            stack = traceback.extract_stack(frame)[-12:] if frame is not None else []
            where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack
                     if "napari" in f.filename or "vispy" in f.filename or "benchmarks" in f.filename]
            self.reports.append((self.ticks[-1], where[-6:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--idle", type=float, default=3.0)
    parser.add_argument("--cached", action="store_true", help="reuse the demo's cache (no extraction)")
    parser.add_argument("--out", default="event_loop.json", help="file name under benchmarks/results/")
    parser.add_argument("--diagnose", action="store_true", help="print where the GUI thread was in each stall")
    args = parser.parse_args()
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        sys.exit('no display: run it under Xvfb, xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python '
                 "benchmarks/bench_event_loop.py")
    if not args.cached:
        os.environ["NAPARI_MIL_CACHE"] = tempfile.mkdtemp(prefix="napari_mil_bench_")
    import warnings

    warnings.filterwarnings("ignore", message="napari support for the PyQt5 backend is deprecated")
    import napari
    import torch
    from bench_slide_to_tiles import machine
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_mil._napari._demo import TeachingDemo

    viewer = napari.Viewer(title="event-loop benchmark", show=True)
    viewer.window.resize(1600, 1000)
    app = QApplication.instance()
    ticks: list[float] = []
    tick = QTimer()
    tick.setTimerType(Qt.TimerType.PreciseTimer)
    tick.setInterval(10)
    tick.timeout.connect(lambda: ticks.append(time.perf_counter()))
    run: dict = {}

    def start():
        run["demo"] = TeachingDemo(viewer, epochs=args.epochs)
        run["demo"].start()

    def check():
        demo = run.get("demo")
        if demo is not None and demo.done and "end" not in run:
            run["end"] = time.perf_counter()
            QTimer.singleShot(int(args.idle * 1000), app.quit)

    watch = QTimer()
    watch.setInterval(50)
    watch.timeout.connect(check)
    import threading

    watch_stalls = StallWatch(ticks, threading.main_thread().ident) if args.diagnose else None
    t_begin = time.perf_counter()
    tick.start()
    watch.start()
    QTimer.singleShot(int(args.idle * 1000), start)
    app.exec_()
    t_quit = time.perf_counter()
    tick.stop()
    watch.stop()
    demo = run["demo"]
    viewer.close()
    if demo.error:
        sys.exit(f"the demo failed: {demo.error}")

    t = np.asarray(ticks)
    marks = {name: demo.t0 + s for name, s in demo.timings.items()}
    train_start = max(marks["features_s"], marks["cohort_ready_s"])
    phases = {
        "idle before (reference)": (t_begin, demo.t0),
        "open slide, detect tissue, tile": (demo.t0, marks["tiled_s"]),
        "extract the slide's features": (marks["tiled_s"], marks["features_s"]),
        "cohort features and MHIM-MIL training with live maps": (train_start, marks["trained_s"]),
        "final teacher | student comparison": (marks["trained_s"], marks["total_s"]),
        "whole demo": (demo.t0, marks["total_s"]),
        "idle after (reference)": (run["end"], t_quit),
    }
    results = {"machine": {**machine(), "torch": torch.__version__, "napari": napari.__version__},
               "protocol": __doc__.split("Protocol.")[1].strip(), "epochs": args.epochs, "fresh_cache": not args.cached,
               "demo_timings_s": demo.timings, "phases": {}}
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; demo marks {demo.timings}")
    for name, (a, b) in phases.items():
        stats = results["phases"][name] = phase_stats(t, a, b)
        if "longest_gap_ms" in stats:
            print(f"{name}: {stats['seconds']:.1f} s, {stats['ticks']} ticks, longest gap {stats['longest_gap_ms']:.0f} ms "
                  f"(at {stats['longest_at_s']:.1f} s), p99 {stats['p99_gap_ms']:.0f} ms, "
                  f"{stats['gaps_over_100ms']} gaps over 100 ms", flush=True)
    ref = results["phases"]["idle before (reference)"]["longest_gap_ms"]
    whole = results["phases"]["whole demo"]["longest_gap_ms"]
    results["whole_over_idle"] = whole / ref
    print(f"longest stall during the demo {whole:.0f} ms (target < 100 ms) = {whole / ref:.1f} x the idle loop's longest gap "
          f"({ref:.0f} ms)")
    if watch_stalls is not None:
        watch_stalls.stop.set()
        t_arr = np.asarray(ticks)
        for last_tick, where in watch_stalls.reports:
            later = t_arr[t_arr > last_tick]
            gap = (later[0] - last_tick) * 1e3 if len(later) else float("nan")
            print(f"stall of {gap:.0f} ms at {last_tick - demo.t0:.2f} s: " + " <- ".join(reversed(where)))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
