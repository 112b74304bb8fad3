"""Feature extraction: patches of a grid -> encoder -> a FeatureBag on disk.

Worker processes read and resize patches (one OpenSlide handle each); the main process moves
uint8 batches to the device (pinned memory, non-blocking copies on CUDA) and encodes them
under inference mode and the encoder's autocast precision. Results are written chunk by chunk
to ``<slide>.partial.h5`` beside the final file, so a cancelled or interrupted run resumes
without redoing finished chunks; the final file appears atomically when all are done.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from napari_mil.errors import EncoderError, ExtractionCancelled, FeatureStoreError, SlideOpenError, SlideReadError
from napari_mil.features.store import FeatureBag, _disk_error, cache_key, cached_bag, feature_path
from napari_mil.tiling import PatchGrid


@dataclass
class ExtractionProgress:
    slide: str
    done: int
    total: int
    tiles_per_s: float
    eta_s: float
    batch_size: int


@dataclass
class ExtractionResult:
    bag: FeatureBag
    path: Path
    cached: bool
    seconds: float
    tiles_per_s: float
    resumed_from: int  # patches already done by an earlier, interrupted run
    skipped: int  # patches whose region could not be read
    batch_size: int  # after any out-of-memory back-off


class PatchDataset:
    """Patches of a grid as uint8 (H, W, 3) tensors; each worker process opens its own slide.

    ``out_size`` resizes in the worker, straight from the read level to the encoder's input
    side: one resampling instead of two, done in parallel processes rather than the main one.
    """

    def __init__(self, slide_path: str, mpp: float | None, grid: PatchGrid, indices: np.ndarray, out_size: int | None = None):
        self.slide_path = str(slide_path)
        self.mpp = mpp
        self.grid = grid
        self.indices = np.asarray(indices, np.int64)
        self.out_size = out_size
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self):
        if self._slide is None or self._pid != os.getpid():
            from napari_mil.slide import open_slide

            self._slide = open_slide(self.slide_path, mpp=self.mpp)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int):
        import torch

        from napari_mil.tiling import read_patch

        index = int(self.indices[i])
        size = self.out_size or self.grid.patch_size
        try:
            patch = read_patch(self._open(), self.grid, index, self.out_size)
            ok = True
        except (SlideReadError, SlideOpenError):  # an unreadable region: recorded and skipped, the run goes on
            patch = np.zeros((size, size, 3), np.uint8)
            ok = False
        return torch.from_numpy(np.require(patch, requirements=["C", "W"])), index, ok


class _BackOff:
    """Encode in micro-batches, halving them whenever the GPU runs out of memory."""

    def __init__(self, batch_size: int):
        self.size = batch_size

    def __call__(self, encoder, batch):
        import torch

        while True:
            try:
                parts = [encoder(batch[i : i + self.size]) for i in range(0, len(batch), self.size)]
                return torch.cat(parts)
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    raise EncoderError("out of GPU memory even one patch at a time; use a smaller encoder or the CPU") from None
                self.size = max(1, self.size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(f"GPU out of memory: batch size halved to {self.size}", stacklevel=2)


def reader_context(num_workers: int):
    """How the reading workers start. Forking copies every lock of the parent in the state its
    other threads hold it: in the viewer, where napari reads slide tiles on the GUI thread, a
    worker forked while OpenSlide held a lock waits for it forever. A process with other threads
    therefore starts its workers from a fork server, a clean single-threaded process that has
    imported this module once (so a worker starts in a fraction of a second, not the seconds a
    fresh interpreter takes to import torch). A single-threaded process (the CLI) forks."""
    import multiprocessing
    import threading

    if not num_workers or threading.active_count() == 1 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    multiprocessing.set_forkserver_preload([__name__])  # no effect once the server runs
    return multiprocessing.get_context("forkserver")


def extract_features(
    slide_path: str | os.PathLike,
    grid: PatchGrid,
    encoder,
    out_root: str | os.PathLike,
    batch_size: int = 64,
    num_workers: int | None = None,
    chunk_size: int = 1024,
    dtype: str = "float16",
    mpp: float | None = None,
    progress: Callable[[ExtractionProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ExtractionResult:
    """Extract (or load from the cache) the features of every patch of ``grid``.

    ``cancel`` is polled between batches; on True the finished chunks stay on disk and
    ExtractionCancelled is raised. ``dtype`` is the on-disk precision (float16 halves the
    files; features are computed in float32 or the encoder's autocast precision).
    """
    import torch

    t_start = time.perf_counter()
    slide_path = Path(slide_path)
    name = grid.slide_name or slide_path.stem
    final = feature_path(out_root, encoder.name, name)
    key = cache_key(slide_path, grid, encoder, dtype)
    cached = cached_bag(final, key)
    if cached is not None:
        seconds = time.perf_counter() - t_start
        return ExtractionResult(cached, final, True, seconds, 0.0, 0, len(cached.skipped_coords), batch_size)

    n = len(grid)
    if n == 0:
        raise FeatureStoreError(f"{name}: the patch grid is empty, nothing to encode")
    n_chunks = -(-n // chunk_size)

    def chunk_rows(c: int) -> np.ndarray:
        return np.arange(c * chunk_size, min(n, (c + 1) * chunk_size))

    partial = final.with_name(final.stem + ".partial.h5")
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        fh = _open_partial(partial, key, n, encoder.dim, dtype, n_chunks)
    except OSError as exc:
        raise _disk_error(exc, partial) from None
    threads = torch.get_num_threads()
    try:
        done_chunks = np.asarray(fh["chunk_done"][:], bool)
        resumed_from = int(sum(len(chunk_rows(c)) for c in np.flatnonzero(done_chunks)))
        todo = np.concatenate([chunk_rows(c) for c in np.flatnonzero(~done_chunks)] or [np.zeros(0, np.int64)])
        device = encoder.device
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(
            PatchDataset(str(slide_path), mpp, grid, todo, getattr(encoder.transform, "resize", None)),
            batch_size=batch_size, shuffle=False,
            num_workers=num_workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if num_workers else None, persistent_workers=False,
            multiprocessing_context=reader_context(num_workers),
        )
        encode = _BackOff(batch_size)
        buffers: dict[int, list] = {}
        if device.type == "cpu" and num_workers:
            # the reading workers need the cores too: an oversubscribed CPU ran end to end at
            # 0.8x of the read-only speed, sharing the cores gave 1.0x (benchmarks/bench_features.py)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))
        t_loop = time.perf_counter()
        processed = 0
        for batch, indices, ok in loader:
            if cancel is not None and cancel():
                raise ExtractionCancelled(
                    f"extraction of {name} cancelled after {resumed_from + processed}/{n} patches; "
                    "finished chunks are kept and the next run resumes"
                )
            batch = batch.to(device, non_blocking=True)
            feats = encode(encoder, batch).cpu().numpy()  # (B, D)
            indices, ok = indices.numpy(), ok.numpy()
            for row, index, good in zip(feats, indices, ok):
                buffers.setdefault(int(index) // chunk_size, []).append((int(index), row, bool(good)))
            for c in [c for c, rows in buffers.items() if len(rows) == len(chunk_rows(c))]:
                _write_chunk(fh, partial, buffers.pop(c), c)
            processed += len(indices)
            if progress is not None:
                rate = processed / max(time.perf_counter() - t_loop, 1e-9)
                progress(ExtractionProgress(name, resumed_from + processed, n, rate, (len(todo) - processed) / max(rate, 1e-9), encode.size))
        if buffers:
            raise FeatureStoreError(f"{name}: {sum(map(len, buffers.values()))} patches were not delivered by the loader")
        features = np.asarray(fh["features"][:])
        valid = np.asarray(fh["valid"][:], bool)
    finally:
        fh.close()
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - t_start
    attrs = {
        "encoder": encoder.name, "weights_hash": encoder.weights_hash, "dim": encoder.dim, "cache_key": key,
        "name": name, "slide_path": str(slide_path), "patch_size_level": grid.patch_size_level, "dtype": dtype,
    }
    bag = FeatureBag(features[valid], grid.coords[valid], attrs, grid.coords[~valid], grid.geometry)
    bag.save(final, dtype=np.float16 if dtype == "float16" else np.float32)
    partial.unlink(missing_ok=True)
    done_now = n - resumed_from
    return ExtractionResult(bag, final, False, elapsed, done_now / max(elapsed, 1e-9), resumed_from,
                            int((~valid).sum()), encode.size)


def _open_partial(path: Path, key: str, n: int, dim: int, dtype: str, n_chunks: int):
    """Open the resumable partial file, starting afresh when it belongs to other inputs."""
    import h5py

    if path.exists():
        try:
            fh = h5py.File(path, "a")
            if fh.attrs.get("cache_key") == key and fh["features"].shape == (n, dim) and len(fh["chunk_done"]) == n_chunks:
                return fh
            fh.close()
        except OSError:
            pass
        path.unlink()
    fh = h5py.File(path, "w")
    fh.attrs["cache_key"] = key
    fh.create_dataset("features", shape=(n, dim), dtype=dtype)
    fh.create_dataset("valid", shape=(n,), dtype=bool)
    fh.create_dataset("chunk_done", data=np.zeros(n_chunks, bool))
    fh.flush()
    return fh


def _write_chunk(fh, path: Path, rows: list, chunk: int) -> None:
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    try:
        fh["features"][start : start + len(rows)] = np.stack([r[1] for r in rows])
        fh["valid"][start : start + len(rows)] = [r[2] for r in rows]
        fh["chunk_done"][chunk] = True
        fh.flush()
    except OSError as exc:
        raise _disk_error(exc, path) from None
