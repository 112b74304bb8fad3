"""Feature-extraction benchmark: pipeline efficiency, cached reruns, and GPU figures.

    .venv/bin/python benchmarks/bench_features.py [--encoder hne_stats] [--slide PATH]

Pipeline efficiency = end-to-end tiles/s / min(read-only tiles/s, encoder-only tiles/s), the
three measured in the same run on the same patches: read-only runs the extraction DataLoader
without encoding, encoder-only runs the encoder on patches already decoded into memory. A
value near 1 means the pipeline is as fast as its slowest stage allows. On a machine with
CUDA it repeats the measurement with resnet50_trunc and a ViT-L/16 of UNI's architecture
(random weights, AMP on), and reports seconds per slide and peak GPU memory.

Without --slide it uses the slide-to-tiles benchmark slide (written on first use).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build_grid(slide_path: Path, magnification: float = 20.0):
    from napari_mil.slide import open_slide
    from napari_mil.tiling import make_patch_grid
    from napari_mil.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        return make_patch_grid(slide, detect_tissue(slide), patch_size=256, magnification=magnification, min_tissue=0.5)


def read_only(slide_path, grid, encoder, batch_size, workers) -> tuple[float, list]:
    import torch

    from napari_mil.features.extract import PatchDataset

    dataset = PatchDataset(str(slide_path), None, grid, np.arange(len(grid)), getattr(encoder.transform, "resize", None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=encoder.device.type == "cuda", prefetch_factor=4 if workers else None)
    keep, t = [], time.perf_counter()
    for batch, _, _ in loader:
        batch = batch.to(encoder.device, non_blocking=True)
        if len(keep) < 16:
            keep.append(batch)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return len(grid) / (time.perf_counter() - t), keep


def encoder_only(encoder, batches, repeats: int = 3) -> float:
    import torch

    encoder(batches[0])  # warm-up (cuDNN autotune, lazy init)
    n, t = 0, time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            encoder(batch)
            n += len(batch)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def end_to_end(slide_path, grid, encoder, batch_size, workers) -> tuple[float, float, float]:
    import torch

    from napari_mil.features.extract import extract_features

    out = Path(tempfile.mkdtemp(prefix="napari-mil-bench-"))
    try:
        if encoder.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        extract_features(slide_path, grid, encoder, out, batch_size=batch_size, num_workers=workers)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if encoder.device.type == "cuda" else 0.0
        t = time.perf_counter()
        again = extract_features(slide_path, grid, encoder, out, batch_size=batch_size, num_workers=workers)
        cached_s = time.perf_counter() - t
        assert again.cached
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return len(grid) / seconds, cached_s, peak


def measure(slide_path, grid, encoder, batch_size, workers, rounds: int = 3) -> dict:
    """Read-only, encoder-only and end-to-end, interleaved over ``rounds``; medians reported."""
    import statistics

    reads, encs, e2es = [], [], []
    for _ in range(rounds):
        read_tps, batches = read_only(slide_path, grid, encoder, batch_size, workers)
        reads.append(read_tps)
        encs.append(encoder_only(encoder, batches))
        e2e_tps, cached_s, peak = end_to_end(slide_path, grid, encoder, batch_size, workers)
        e2es.append(e2e_tps)
    read_tps, enc_tps, e2e_tps = statistics.median(reads), statistics.median(encs), statistics.median(e2es)
    return {
        "encoder": encoder.name, "device": str(encoder.device), "precision": str(encoder.precision),
        "patches": len(grid), "batch_size": batch_size, "workers": workers,
        "read_only_tiles_per_s": round(read_tps, 1), "encoder_only_tiles_per_s": round(enc_tps, 1),
        "end_to_end_tiles_per_s": round(e2e_tps, 1),
        "pipeline_efficiency": round(e2e_tps / min(read_tps, enc_tps), 3),
        "rounds": {"read_only": [round(v, 1) for v in reads], "end_to_end": [round(v, 1) for v in e2es]},
        "seconds_per_slide": round(len(grid) / e2e_tps, 2), "cached_rerun_s": round(cached_s, 3),
        "peak_gpu_memory_gib": round(peak, 2),
    }


def vit_l16(device):
    """A ViT-L/16 of UNI's architecture (24 layers, 1024-d, 16 heads, 224 px), random weights."""
    import torch
    from torch import nn

    from napari_mil.encoders.base import Encoder
    from napari_mil.encoders.transforms import BatchTransform

    class ViT(nn.Module):
        def __init__(self, dim=1024, depth=24, heads=16, patch=16, size=224):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, patch)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):  # (B, 3, 224, 224)
            x = self.embed(x).flatten(2).transpose(1, 2)  # (B, 196, D)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos  # (B, 197, D)
            return self.norm(self.blocks(x))[:, 0]  # (B, D)

    model = ViT().to(device).eval()
    return Encoder("vit_l16_random", model, BatchTransform(224, None), torch.float16, 1024, 224, "random", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="hne_stats")
    parser.add_argument("--slide", default=None, help="slide to extract (default: the 51200 x 40960 benchmark slide)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    import os

    import torch

    from bench_slide_to_tiles import benchmark_slide, machine
    from napari_mil.encoders import create_encoder

    slide_path = Path(args.slide) if args.slide else benchmark_slide(51200, 40960)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    grid = build_grid(slide_path)
    results = {"machine": machine(), "slide": str(slide_path.name), "runs": []}
    if torch.cuda.is_available():
        results["machine"]["gpu"] = torch.cuda.get_device_name()
    print(f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores)"
          + (f", {results['machine']['gpu']}" if torch.cuda.is_available() else ", no GPU"))
    print(f"slide {slide_path.name}: {len(grid)} patches of 256 px at 20x")

    encoders = [create_encoder(args.encoder, device="cpu" if not torch.cuda.is_available() else "auto")]
    if torch.cuda.is_available():
        from napari_mil.encoders.resnet import _resnet50_trunc

        weights = Path(tempfile.mkdtemp()) / "resnet50_random.pth"
        torch.save(_resnet50_trunc().state_dict(), weights)
        encoders += [create_encoder("resnet50_trunc", weights=weights, device="cuda"), vit_l16(torch.device("cuda"))]
    for encoder in encoders:
        batch = args.batch_size if encoder.device.type == "cpu" else 256
        r = measure(slide_path, grid, encoder, batch, workers)
        results["runs"].append(r)
        print(f"{r['encoder']:16s} on {r['device']}: read {r['read_only_tiles_per_s']:.0f}, encoder {r['encoder_only_tiles_per_s']:.0f}, "
              f"end-to-end {r['end_to_end_tiles_per_s']:.0f} tiles/s -> pipeline efficiency {r['pipeline_efficiency']:.2f}; "
              f"{r['seconds_per_slide']:.1f} s/slide; cached rerun {r['cached_rerun_s']:.3f} s"
              + (f"; peak GPU memory {r['peak_gpu_memory_gib']:.1f} GiB" if r["peak_gpu_memory_gib"] else ""))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "features.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
