"""Training speed: the trainer against a bare loop and torchmil, MHIM-MIL's cost, TransMIL on a 100k-instance bag.

    .venv/bin/python benchmarks/bench_training_speed.py  # about 20 minutes on 2 cores

Options (defaults): --bags 200 --instances 5000 --transmil-bags 20 --epochs 3 --models
abmil,transmil --big-bag 100000 (0 skips it) --out training_speed.json, --no-mhim. The torchmil
comparison needs `pip install torchmil` (the `bench` extra); without it, or with --no-torchmil,
it is skipped.

Protocol. Bags: --bags bags of --instances instances of 1,024 float32 features held in memory
(200 x 5,000 x 1,024 = 4.1 GB), standard normal from a fixed seed; every second bag is positive,
and in it 5% of the instances are shifted by 3 along a fixed random direction (a signal the
models learn). Two more bags of the same size, one per class, are the validation set. ABMIL
trains on all bags, TransMIL on the first --transmil-bags (a step is ~60x slower on a CPU).

Per model, in its default configuration (abmil: 1,024 -> 128 embedding, 128-d attention;
transmil: 512-d, 8 heads of 64, 256 landmarks), one `train()` run of 1 + --epochs epochs on the
CPU (seed 0, patience never reached). Its `EpochReport.seconds` is what is timed: the shuffled
pass over the training bags (tensor from numpy, forward, class-weighted cross-entropy,
zero_grad, backward, Adam step, loss.item()) followed by the validation pass (forward of the
2 validation bags, AUC). From the trainer's `on_epoch` callback, i.e. between its epochs, one
epoch of each reference runs, so the loops alternate epoch by epoch under the same machine load:
- bare: the same model (`create_model`, same seed) and Adam (same lr and weight decay) in the
  minimal loop `for bag: out = model(x); loss = cross_entropy(out.logits, y); zero_grad();
  backward(); step()` over tensors made beforehand, no validation;
- torchmil: its ABMIL (feat_ext Linear(1,024, 128) + ReLU, att_dim 128) or TransMIL (feat_ext
  Linear(1,024, 512) + ReLU, att_dim 512, 8 heads, 256 landmarks; no MLP, dropout 0) in the same
  bare loop with its own loss (BCE with logits on its one-logit head).
The first epoch of each is a warm-up; figures are medians of the other --epochs. MHIM: a second
`train()` run with `mhim=preset("camelyon16_<model>")`, with a bare epoch between its epochs again
(so the two runs' bare medians show whether the machine's speed changed); ratio = its median
epoch over the plain run's. Big bag: in a fresh child process per model, one forward and one
backward (cross-entropy) of one bag of --big-bag x 1,024 random features, training mode; peak
memory is the child's peak RSS (VmHWM), which includes Python, torch and the 0.4 GB input.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DIM = 1024


def make_bags(n_bags: int, n_inst: int, seed: int = 0) -> list:
    from napari_mil.training.data import Bag

    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(DIM).astype(np.float32)
    direction *= 3.0 / np.linalg.norm(direction)
    bags = []
    for i in range(n_bags):
        x = rng.standard_normal((n_inst, DIM), dtype=np.float32)
        if i % 2:
            x[rng.choice(n_inst, max(1, n_inst // 20), replace=False)] += direction
        bags.append(Bag(f"bag{i}", i % 2, f"patient{i}", x, np.zeros((n_inst, 2), np.int64)))
    return bags


def reference_models(name: str, with_torchmil: bool) -> dict:
    """label -> (model, loss(output, y)); built with the trainer's seed."""
    from torch import nn

    from napari_mil.models import create_model

    torch.manual_seed(0)
    refs = {"bare": (create_model(name, DIM, 2), lambda out, y: F.cross_entropy(out.logits, y))}
    if with_torchmil:
        import torchmil.models as tm

        torch.manual_seed(0)
        if name == "abmil":
            model = tm.ABMIL(in_shape=(DIM,), att_dim=128, feat_ext=nn.Sequential(nn.Linear(DIM, 128), nn.ReLU()))
        else:
            model = tm.TransMIL(in_shape=(DIM,), att_dim=512, n_heads=8, n_landmarks=256,
                                feat_ext=nn.Sequential(nn.Linear(DIM, 512), nn.ReLU()))
        refs["torchmil"] = (model, lambda out, y: F.binary_cross_entropy_with_logits(out, y.float()))
    return refs


def bare_epoch(model, opt, loss_fn, data) -> float:
    model.train()
    t0 = time.perf_counter()
    for x, y in data:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    return statistics.median(values[1:])  # the first epoch is a warm-up


def bench_model(name: str, bags, val, epochs: int, with_torchmil: bool, with_mhim: bool) -> dict:
    from napari_mil.models import parameter_counts
    from napari_mil.training.mhim import preset
    from napari_mil.training.trainer import TrainConfig, train

    data = [(torch.from_numpy(b.features)[None], torch.tensor([b.label])) for b in bags]
    refs = {label: (model, torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-4), loss_fn)
            for label, (model, loss_fn) in reference_models(name, with_torchmil).items()}
    cfg = TrainConfig(model=name, epochs=1 + epochs, patience=epochs + 2, device="cpu")
    result = {"model": name, "bags": len(bags), "instances": bags[0].features.shape[0],
              "parameters": {label: parameter_counts(m)[1] for label, (m, _, _) in refs.items()}}

    def run(mhim) -> dict:
        times = {k: [] for k in (["trainer", "bare"] if mhim else ["trainer", *refs])}

        def on_epoch(report):
            times["trainer"].append(report.seconds)
            for label, values in times.items():
                if label != "trainer":
                    values.append(bare_epoch(*refs[label], data))
            print(f"  {name}{' MHIM' if mhim else ''} epoch {report.epoch}: "
                  + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()) + f", loss {report.train_loss:.3f}", flush=True)

        history = train(bags, val, replace(cfg, mhim=mhim), on_epoch=on_epoch).history
        return {"epochs_s": times, "median_s": {k: median(v) for k, v in times.items()},
                "train_loss": [h.train_loss for h in history]}

    plain = run(None)
    med = plain["median_s"]
    result["plain"] = plain
    result["trainer_over_bare"] = med["trainer"] / med["bare"]
    print(f"{name}: trainer {med['trainer']:.2f} s/epoch, bare loop {med['bare']:.2f} s -> ratio "
          f"{result['trainer_over_bare']:.3f} (target <= 1.3)")
    if "torchmil" in med:
        result["trainer_over_torchmil"] = med["trainer"] / med["torchmil"]
        result["bare_over_torchmil"] = med["bare"] / med["torchmil"]
        print(f"{name}: torchmil {med['torchmil']:.2f} s/epoch -> trainer/torchmil {result['trainer_over_torchmil']:.3f}, "
              f"bare/torchmil {result['bare_over_torchmil']:.3f} (target <= 1)")
    if with_mhim:
        mhim = run(preset(f"camelyon16_{name}"))
        result["mhim"] = mhim
        result["mhim_over_plain"] = mhim["median_s"]["trainer"] / med["trainer"]
        print(f"{name}: MHIM {mhim['median_s']['trainer']:.2f} s/epoch -> {result['mhim_over_plain']:.3f} x plain "
              f"(target <= 1.5); bare loop during it {mhim['median_s']['bare']:.2f} s (during plain {med['bare']:.2f} s)")
    return result


def rss_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in GiB. Not getrusage's ru_maxrss: Linux carries
    that over from the parent through fork and exec, so a child of a 4 GB parent would start at 4 GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def big_bag_child(which: str, n: int) -> None:
    """One forward and backward of TransMIL on an n-instance bag; prints a JSON line."""
    model, loss_fn = reference_models("transmil", which == "torchmil")["bare" if which == "napari_mil" else which]
    x = torch.randn(1, n, DIM, generator=torch.Generator().manual_seed(0))
    before = rss_gib("VmRSS")
    t0 = time.perf_counter()
    out = model.train()(x)
    t1 = time.perf_counter()
    loss_fn(out, torch.tensor([1])).backward()
    t2 = time.perf_counter()
    print(json.dumps({"model": which, "instances": n, "forward_s": t1 - t0, "backward_s": t2 - t1,
                      "rss_before_gib": before, "peak_rss_gib": rss_gib("VmHWM")}))


def big_bag(which: str, n: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", which, "--big-bag", str(n)], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"the {which} big-bag child failed:\n{proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"TransMIL ({which}), one {n:,}-instance bag: forward {r['forward_s']:.1f} s, backward {r['backward_s']:.1f} s, "
          f"peak RSS {r['peak_rss_gib']:.2f} GiB = {r['peak_rss_gib'] * 2**30 / 1e9:.2f} GB "
          f"(before the forward: {r['rss_before_gib']:.2f} GiB; target < 8 GB)", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--instances", type=int, default=5000)
    parser.add_argument("--transmil-bags", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--models", default="abmil,transmil")
    parser.add_argument("--no-torchmil", action="store_true")
    parser.add_argument("--no-mhim", action="store_true")
    parser.add_argument("--big-bag", type=int, default=100_000, help="instances of the TransMIL bag (0: skip)")
    parser.add_argument("--out", default="training_speed.json", help="file name under benchmarks/results/")
    parser.add_argument("--child", choices=["napari_mil", "torchmil"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return big_bag_child(args.child, args.big_bag)
    from bench_slide_to_tiles import machine

    torchmil = None  # its version, when it takes part
    if not args.no_torchmil:
        try:
            torchmil = importlib.metadata.version("torchmil")
        except importlib.metadata.PackageNotFoundError:
            print("torchmil is not installed (pip install torchmil): its comparison is skipped")
    results = {"machine": {**machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
               "torchmil": torchmil, "protocol": __doc__.split("Protocol.")[1].strip(), "models": [],
               "big_bag": []}
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch {torch.__version__}, "
          f"torchmil {torchmil or 'not used'}", flush=True)
    if args.big_bag:  # first, while this process is small
        for which in ["napari_mil", "torchmil"] if torchmil else ["napari_mil"]:
            results["big_bag"].append(big_bag(which, args.big_bag))
    t0 = time.perf_counter()
    n_bags = max(args.bags, args.transmil_bags)
    bags, val = make_bags(n_bags, args.instances), make_bags(2, args.instances, seed=1)
    print(f"{n_bags} bags x {args.instances:,} instances x {DIM} made in {time.perf_counter() - t0:.0f} s", flush=True)
    for name in args.models.split(","):
        n = args.bags if name != "transmil" else args.transmil_bags
        results["models"].append(bench_model(name, bags[:n], val, args.epochs, bool(torchmil), not args.no_mhim))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
