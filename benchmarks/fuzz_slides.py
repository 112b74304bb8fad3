"""Mutation fuzzing of the slide opener and reader: no byte mutant of a slide may kill the process.

    .venv/bin/python benchmarks/fuzz_slides.py --mutants 300 [--seed 0] [--jobs 2] [--timeout 20]

It writes a small JPEG-tiled pyramidal TIFF (2048 x 1536 px, 256 px tiles, two levels) and the
same pyramid as a BigTIFF, then makes seeded byte mutants of them: tag values, counts and types
overwritten with boundary values, offset-table entries changed, IFD and JPEG header bytes, JPEG
data flipped or overwritten, truncations. Each mutant is opened with ``open_slide`` and read
(regions at level 0 and at the last level, and the tissue-detection thumbnail) in a worker
process, alternately as ``.tif`` (read by OpenSlide) and ``.btf`` (read by the tifffile fallback). Workers are persistent and run in parallel; one
that dies (a C-level abort) or stops answering (a hang) is counted against the mutant it was
reading and replaced. Every outcome is counted:

- clean errors: a NapariMilError (the project's errors) at open or at read;
- unchanged: opened and read the same pixels as the original;
- silent changes: opened and read without error, but other pixels (damaged JPEG data decodes);
- aborts: the worker process died; hangs: no answer within the timeout;
- uncaught: any other exception escaped.

The test suite runs the same harness (tests/test_slide_fuzz.py); this script prints the counts
and writes them to benchmarks/results/fuzz_slides.json.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUTCOMES = ("clean_error", "unchanged", "silent_change", "abort", "hang", "uncaught")
MPP = 0.25
SEEDS = ("classic", "big")
BACKENDS = (".tif", ".btf")  # open_slide reads .tif with OpenSlide, .btf with the tifffile fallback
WORKER_MEMORY = 4 * 1024**3  # address-space limit of a worker: a runaway allocation fails, not the machine

# ---- the seed slide and its mutants -------------------------------------------------------------


def write_seed_slides(folder: Path) -> dict[str, Path]:
    """The classic TIFF and BigTIFF seeds (each also as .btf, for the fallback)."""
    import tifffile

    from napari_mil.synthetic import make_synthetic_slide

    classic = Path(make_synthetic_slide(folder / "seed-classic.tif", width=2048, height=1536, mpp=MPP, seed=5,
                                        tile=256, tumour_burden=0.1, workers=1).path)
    big = folder / "seed-big.tif"
    res = (1e4 / MPP, 1e4 / MPP)
    with tifffile.TiffFile(classic) as tf, tifffile.TiffWriter(big, bigtiff=True) as tw:
        for i, page in enumerate(tf.pages):
            tw.write(page.asarray(), tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=int(i > 0),
                     resolution=(res[0] / 4**i, res[1] / 4**i), resolutionunit="CENTIMETER")
    seeds = {"classic": classic, "big": big}
    for path in seeds.values():
        path.with_suffix(".btf").write_bytes(path.read_bytes())
    return seeds


def _layout(path: Path) -> dict:
    """Where the seed's IFD entries, out-of-line tag values and image data lie."""
    import tifffile

    entries, arrays, data = [], [], []
    with tifffile.TiffFile(path) as tf:
        wide = tf.is_bigtiff
        for page in tf.pages:
            for tag in page.tags:
                entries.append(tag.offset)
                if tag.valueoffset != tag.offset + (12 if wide else 8):  # stored out of line
                    arrays.append((tag.valueoffset, tag.valuebytecount))
            data += [(int(o), int(c)) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
    return {"bigtiff": wide, "entries": entries, "arrays": arrays, "data": data}


INTERESTING = (0, 1, 2, 7, 16, 255, 256, 4096, 32767, 65535, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1560281600)


def mutate(seed_bytes: bytes, layout: dict, rng: np.random.Generator) -> tuple[bytes, str]:
    """One mutant of the seed and a short description of what changed."""
    data = bytearray(seed_bytes)
    size = len(data)
    kind = rng.choice(["tag_value", "tag_value", "tag_count", "tag_type", "array_entry", "ifd_bytes",
                       "tile_header", "data_bytes", "truncate"])
    wide = layout["bigtiff"]  # 20-byte entries; the low half of their 8-byte counts and values is changed
    if kind in ("tag_value", "tag_count", "tag_type", "ifd_bytes"):
        entry = int(rng.choice(layout["entries"]))
        if kind == "tag_type":
            struct.pack_into("<H", data, entry + 2, int(rng.integers(0, 20)))
            return bytes(data), f"type of the entry at {entry}"
        field = entry + (4 if kind == "tag_count" else (12 if wide else 8))
        if kind == "ifd_bytes":
            at = entry + int(rng.integers(0, 20 if wide else 12))
            data[at] = int(rng.integers(0, 256))
            return bytes(data), f"byte {at} of an IFD entry"
        old = struct.unpack_from("<I", data, field)[0]
        value = int(rng.choice([*INTERESTING, old + 1, max(old - 1, 0), old * 2, size, size + 1,
                                int(rng.integers(0, 2**32))])) & 0xFFFFFFFF
        struct.pack_into("<I", data, field, value)
        return bytes(data), f"{kind} at {field}: {old} -> {value}"
    if kind == "array_entry" and layout["arrays"]:
        offset, nbytes = layout["arrays"][int(rng.integers(len(layout["arrays"])))]
        at = offset + 4 * int(rng.integers(0, max(nbytes // 4, 1)))
        if at + 4 <= size:
            value = int(rng.choice([*INTERESTING, size, size - 1, int(rng.integers(0, size))]))
            struct.pack_into("<I", data, at, value & 0xFFFFFFFF)
            return bytes(data), f"array word at {at} -> {value}"
    if kind == "truncate":
        keep = int(rng.integers(8, size))
        return bytes(data[:keep]), f"truncated to {keep} bytes"
    # bytes inside one JPEG tile (in its markers and tables, or anywhere): a run overwritten or bits flipped
    offset, count = layout["data"][int(rng.integers(len(layout["data"])))]
    at = offset + int(rng.integers(0, min(count, 700) if kind == "tile_header" else count))
    if rng.random() < 0.5:
        run = int(rng.integers(1, 64))
        data[at : at + run] = rng.integers(0, 256, len(data[at : at + run]), dtype=np.uint8).tobytes()
        return bytes(data), f"{run} random bytes at {at}"
    for _ in range(int(rng.integers(1, 8))):
        pos = min(at + int(rng.integers(0, 64)), size - 1)
        data[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(data), f"bits flipped near {at}"


# ---- the worker: opens and reads one mutant per request ------------------------------------------


def _reads(path: str):
    """The pixels the fuzz compares: level-0 regions, the last level and the thumbnail."""
    from dataclasses import replace

    from napari_mil.slide import open_slide
    from napari_mil.tissue import read_thumbnail

    with open_slide(path) as slide:
        w, h = slide.dimensions
        out = [slide.read_region(loc, 0, size) for loc, size in
               [((0, 0), (256, 256)), ((w // 2 - 150, h // 2 - 100), (300, 200)), ((w - 100, h - 100), (100, 100))]]
        last = slide.level_count - 1
        lw, lh = slide.level_dimensions[last]
        out.append(slide.read_region((0, 0), last, (min(lw, 1024), min(lh, 1024))))
        if slide.mpp is None:
            slide = replace(slide, mpp=MPP, mpp_source="user")
        out.append(read_thumbnail(slide, 8.0)[0])
        return out


def worker(folder: str) -> None:
    """Answer one JSON line per mutant path read from stdin, after one line when ready."""
    import resource
    import traceback

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what C libraries print goes to stderr, not into the answers
    from napari_mil.errors import NapariMilError

    # each seed through each backend: .tif opens with OpenSlide, .btf with the tifffile fallback
    reference = {(kind, ext): _reads(str(Path(folder) / f"seed-{kind}{ext}")) for kind in SEEDS for ext in BACKENDS}
    protocol.write(json.dumps({"outcome": "ready", "detail": ""}) + "\n")
    for line in sys.stdin:
        path = json.loads(line)["path"]
        try:
            kind = Path(path).stem.rpartition("-")[2]
            pixels, expected = _reads(path), reference[kind, Path(path).suffix]
            same = len(pixels) == len(expected) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(pixels, expected))
            outcome, detail = ("unchanged" if same else "silent_change"), ""
        except NapariMilError as exc:
            outcome, detail = "clean_error", f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001  counted: anything else is a finding
            outcome = "uncaught"
            detail = f"{type(exc).__name__}: {exc} | " + traceback.format_exc(limit=-3).replace("\n", " ")[-600:]
        protocol.write(json.dumps({"outcome": outcome, "detail": detail}) + "\n")


# ---- the parent: workers in parallel, each death or silence attributed to its mutant ------------


class _Worker:
    def __init__(self, folder: Path, log: Path):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(folder)],
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         text=True, bufsize=1)
        self.task = None  # (index, mutation, path) of the mutant being read; None until ready
        self.busy, self.started = True, time.monotonic()

    def send(self, path: Path, task) -> None:
        self.task, self.busy, self.started = task, True, time.monotonic()
        self.proc.stdin.write(json.dumps({"path": str(path)}) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_fuzz(n_mutants: int = 300, seed: int = 0, jobs: int | None = None, timeout: float = 20.0,
             folder: str | os.PathLike | None = None) -> dict:
    """Fuzz ``n_mutants`` mutants; returns the counts, the findings (every abort, hang and uncaught
    exception, with the mutation) and a sample of the clean errors."""
    jobs = jobs or min(2, os.cpu_count() or 1)
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-slides-") if folder is None else None
    work = Path(folder or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    seeds = write_seed_slides(work)
    seed_bytes = {kind: path.read_bytes() for kind, path in seeds.items()}
    layouts = {kind: _layout(path) for kind, path in seeds.items()}
    counts = dict.fromkeys(OUTCOMES, 0)
    findings, clean, every = [], [], {}
    pending = list(range(n_mutants))
    sel = selectors.DefaultSelector()
    workers: list[_Worker] = []

    def start(i: int) -> _Worker:
        w = _Worker(work, work / f"worker{i}.log")
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        return w

    def next_task(w: _Worker) -> None:
        w.task, w.busy = None, False
        if not pending:
            return
        index = pending.pop(0)
        kind, ext = SEEDS[index // 2 % 2], BACKENDS[index % 2]  # every seed through every backend in turn
        data, what = mutate(seed_bytes[kind], layouts[kind], np.random.default_rng([seed, index]))
        what = f"{kind}{ext}: {what}"
        path = work / f"mutant{index}-{kind}{ext}"
        path.write_bytes(data)
        w.send(path, (index, what, path))

    def replace_worker(w: _Worker) -> None:
        sel.unregister(w.proc.stdout)
        w.stop()
        fresh = start(workers.index(w))
        workers[workers.index(w)] = fresh

    def record(w: _Worker, outcome: str, detail: str) -> None:
        if w.task is None:  # a fresh worker reading the unmutated slide
            if outcome != "ready":
                raise RuntimeError(f"the unmutated seed slide fails: {outcome} {detail}")
            return
        index, what, path = w.task
        counts[outcome] += 1
        entry = {"mutant": index, "mutation": what, "outcome": outcome, "detail": detail}
        every[index] = entry
        if outcome in ("abort", "hang", "uncaught"):
            findings.append(entry)
        elif outcome == "clean_error" and len(clean) < 20:
            clean.append(entry)
        path.unlink(missing_ok=True)

    try:
        for i in range(jobs):
            workers.append(start(i))
        while any(w.busy for w in workers):
            for key, _ in sel.select(timeout=0.5):
                w = key.data
                line = w.proc.stdout.readline()
                if not line:  # the worker died reading this mutant
                    rc = w.proc.wait()
                    tail = w.log.read_bytes()[-300:].decode(errors="replace").strip().splitlines()
                    record(w, "abort", f"exit code {rc}: {tail[-1] if tail else ''}")
                    replace_worker(w)
                    continue
                answer = json.loads(line)
                record(w, answer["outcome"], answer["detail"])
                next_task(w)
            now = time.monotonic()
            for w in list(workers):
                if w.busy and now - w.started > timeout:
                    record(w, "hang", f"no answer in {timeout:.0f} s")
                    replace_worker(w)
    finally:
        for w in workers:
            w.stop()
        if tmp is not None:
            tmp.cleanup()
    return {"mutants": n_mutants, "seed": seed, "jobs": jobs, "seconds": round(time.monotonic() - t0, 1),
            "counts": counts, "findings": findings, "clean_error_sample": clean,
            "outcomes": [every[i] for i in sorted(every)]}


def summary(result: dict) -> str:
    c = result["counts"]
    return (f"{result['mutants']} mutants in {result['seconds']} s: {c['clean_error']} clean errors, "
            f"{c['unchanged']} unchanged reads, {c['silent_change']} silent pixel changes, {c['abort']} aborts, "
            f"{c['hang']} hangs, {c['uncaught']} uncaught")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mutants", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a mutant counts as a hang")
    ap.add_argument("--worker", metavar="SEED", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    result = run_fuzz(args.mutants, args.seed, args.jobs, args.timeout)
    print(summary(result))
    for f in result["findings"]:
        print(f"  mutant {f['mutant']} ({f['mutation']}): {f['outcome']}: {f['detail']}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "fuzz_slides.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
