"""Benchmark: the tutorial's training loop vs this project's train stage vs the fast recipe.

    python benchmarks/bench.py [--epochs 10] [--fast-epochs N] [--limit IMAGES] [--out benchmarks/results]

All routes run in one invocation, on the same machine, data (data/raw/fashion_mnist, from `dvc repro
download`) and thread count, each in its own process so that its peak memory is its own:

- reference: the tutorial's loop as the tutorial writes it: torchvision's FashionMNIST with per-sample
  PIL transforms (Pad(2), ToTensor), DataLoader(batch_size=64, shuffle=True), the Tudui net, SGD lr 0.01,
  a test pass after every epoch;
- project: the train stage's own `fit` with the same model and hyperparameters (params.yaml as committed);
- fast: the fast recipe (benchmarks/fast_recipe.yaml over params.yaml), and fast-short, the same recipe
  fitted to fewer epochs.

Every route trains on the same 55,000 images (the project's validation split is held out) and is tested
on the 10,000 test images after every epoch. Elapsed times are wall-clock seconds of training plus those
per-epoch test passes; speeds count training only. Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAW = ROOT / "data/raw/fashion_mnist"
PRESET = Path(__file__).with_name("fast_recipe.yaml")
SEED = 0


def project_params(preset: bool, epochs: int, overrides: list[str] = ()):
    """params.yaml, with the fast recipe and then `overrides` ("train.lr=0.2", YAML values) over it."""
    from stages.lib.params import read_yaml, validate

    params = read_yaml(ROOT / "params.yaml")
    changes = yaml.safe_load(PRESET.read_text()) if preset else {}
    changes.update((k, yaml.safe_load(v)) for k, v in (o.split("=", 1) for o in overrides))
    for key, value in changes.items():
        section, name = key.split(".")
        params[section][name] = value
    params["train"]["epochs"] = epochs
    params["train"]["device"] = "auto"
    return validate(params)


def prepared(params: dict, args):
    """The project's preprocess, in memory: ({"train": (x, y), "val": the test split}, meta)."""
    from stages.lib.datasets import FASHION_MNIST
    from stages.preprocess import prepare

    splits, meta = prepare(FASHION_MNIST.read(Path(args.raw), params.preprocess), params.preprocess, params.seed)
    train, test = splits["train"], splits["test"]
    return {"train": (train["images"][:args.limit or None], train["labels"][:args.limit or None]),
            "val": (test["images"][:args.test_limit or None], test["labels"][:args.test_limit or None])}, meta


def run_project(preset: bool, epochs: int, args) -> list[dict]:
    from stages.lib.engine import resolve_device
    from stages.train import QUIET, Callbacks, fit

    params = project_params(preset, epochs, args.set if preset else ())
    data, meta = prepared(params, args)
    device = resolve_device("auto")
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in data.items()}
    rows, last = [], [time.perf_counter()]

    def on_epoch(row, seconds, checkpoint):  # the test pass has just run
        now = time.perf_counter()
        rows.append({"epoch": row["epoch"], "train_seconds": seconds, "elapsed_seconds": now - last[0],
                     "test_accuracy": row["val_accuracy"], "images": len(data["train"][1])})
        last[0] = now

    fit(params, meta, data, device, callbacks=Callbacks(on_epoch=on_epoch, print=QUIET.print))
    return rows


class Tudui(torch.nn.Module):
    """The tutorial's model.py, with one input channel for Fashion-MNIST."""

    def __init__(self):
        super().__init__()
        from torch import nn

        self.model = nn.Sequential(nn.Conv2d(1, 32, 5, 1, 2), nn.MaxPool2d(2), nn.Conv2d(32, 32, 5, 1, 2),
                                   nn.MaxPool2d(2), nn.Conv2d(32, 64, 5, 1, 2), nn.MaxPool2d(2), nn.Flatten(),
                                   nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10))

    def forward(self, x):
        return self.model(x)


def run_reference(epochs: int, args) -> list[dict]:
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, Subset

    from stages.preprocess import carve

    root = Path(tempfile.mkdtemp(prefix="bench-fmnist-"))
    (root / "FashionMNIST/raw").mkdir(parents=True)
    for gz in Path(args.raw).glob("*.gz"):  # torchvision wants the uncompressed idx files
        (root / "FashionMNIST/raw" / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    val_size = project_params(False, epochs).preprocess.val_size
    _, train_idx = carve(60000, val_size, torch.Generator().manual_seed(SEED))  # the project's split
    transform = torchvision.transforms.Compose([torchvision.transforms.Pad(2), torchvision.transforms.ToTensor()])
    train_data = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform)
    test_data = torchvision.datasets.FashionMNIST(str(root), train=False, transform=transform)
    train_data = Subset(train_data, train_idx[:args.limit or None].tolist())
    test_data = Subset(test_data, range(min(args.test_limit or len(test_data), len(test_data))))

    torch.manual_seed(SEED)
    train_dataloader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_dataloader = DataLoader(test_data, batch_size=64)
    tudui = Tudui()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(tudui.parameters(), lr=0.01)
    rows, total_train_step, losses = [], 0, []
    for i in range(epochs):
        began = time.perf_counter()
        tudui.train()
        for imgs, targets in train_dataloader:
            outputs = tudui(imgs)
            loss = loss_fn(outputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_train_step += 1
            if total_train_step % 100 == 0:
                losses.append(loss.item())  # the tutorial prints it and writes it to TensorBoard
        trained = time.perf_counter()
        tudui.eval()
        total_accuracy = 0
        with torch.no_grad():
            for imgs, targets in test_dataloader:
                total_accuracy += (tudui(imgs).argmax(1) == targets).sum().item()
        rows.append({"epoch": i + 1, "train_seconds": trained - began, "elapsed_seconds": time.perf_counter() - began,
                     "test_accuracy": total_accuracy / len(test_data), "images": len(train_data)})
    return rows


def run_route(route: str, args) -> dict:
    """One route in this process: its per-epoch rows and its peak RSS."""
    torch.set_num_threads(args.threads)
    if route == "reference":
        rows = run_reference(args.epochs, args)
    elif route == "project":
        rows = run_project(False, args.epochs, args)
    else:
        epochs = args.fast_short_epochs if route == "fast-short" else args.fast_epochs
        rows = run_project(True, epochs, args)
    return {"route": route, "epochs": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def summarize(result: dict, targets: list[float]) -> dict:
    rows = result["epochs"]
    train_seconds = sum(r["train_seconds"] for r in rows)
    elapsed, reached = 0.0, {}
    for row in rows:
        elapsed += row["elapsed_seconds"]
        for target in targets:
            if row["test_accuracy"] >= target and target not in reached:
                reached[target] = round(elapsed, 1)
    return {"route": result["route"], "epochs": len(rows),
            "images_per_s": round(sum(r["images"] for r in rows) / train_seconds, 1),
            "seconds_per_epoch": round(train_seconds / len(rows), 2),
            "elapsed_seconds": round(sum(r["elapsed_seconds"] for r in rows), 1),
            "test_accuracy": rows[-1]["test_accuracy"], "accuracy_per_epoch": [r["test_accuracy"] for r in rows],
            "seconds_to_reach": {f"{t:.4f}": reached.get(t) for t in targets},
            "peak_rss_mb": round(result["peak_rss_mb"])}


def markdown(summary: list[dict], checks: dict, machine: str) -> str:
    targets = list(summary[0]["seconds_to_reach"])
    lines = [f"Machine: {machine}", "",
             "| route | epochs | images/s | s/epoch | elapsed s | test acc | " +
             " | ".join(f"s to {float(t):.2%}" for t in targets) + " | peak RSS MB |",
             "|---" * (7 + len(targets)) + "|"]
    for s in summary:
        reach = " | ".join("—" if s["seconds_to_reach"][t] is None else f"{s['seconds_to_reach'][t]:.0f}"
                           for t in targets)
        lines.append(f"| {s['route']} | {s['epochs']} | {s['images_per_s']:,.0f} | {s['seconds_per_epoch']:.1f} | "
                     f"{s['elapsed_seconds']:.0f} | {s['test_accuracy']:.2%} | {reach} | {s['peak_rss_mb']} |")
    lines += ["", "Test accuracy per epoch:", ""]
    lines += [f"- {s['route']}: " + ", ".join(f"{a:.2%}" for a in s["accuracy_per_epoch"]) for s in summary]
    lines += ["", "Checks:", ""] + [f"- {name}: {value}" for name, value in checks.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the reference and project routes")
    parser.add_argument("--fast-epochs", type=int, default=None, help="epochs of the fast recipe (default: its preset)")
    parser.add_argument("--fast-short-epochs", type=int, default=1, help="epochs of the short fast recipe")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (0 = all 55,000)")
    parser.add_argument("--test-limit", type=int, default=0, help="test on the first N images only (0 = all 10,000)")
    parser.add_argument("--raw", type=Path, default=RAW, help="folder with the four Fashion-MNIST .gz files")
    parser.add_argument("--routes", default="reference,project,fast-short,fast")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the fast recipe, e.g. --set train.lr=0.2 (repeatable)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--print-recipe", action="store_true", help="print the fast recipe as `dvc exp run` flags")
    parser.add_argument("--route", help=argparse.SUPPRESS)  # internal: run one route, print its JSON
    args = parser.parse_args()
    if args.print_recipe:
        recipe = yaml.safe_load(PRESET.read_text())
        print(" ".join(f"-S {k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in recipe.items()))
        return
    if args.fast_epochs is None:
        args.fast_epochs = yaml.safe_load(PRESET.read_text())["train.epochs"]
    if args.route:
        print(json.dumps(run_route(args.route, args)))
        return
    if not args.raw.is_dir():
        sys.exit(f"{args.raw} not found: run `dvc repro download` first, or pass --raw")

    results = {}
    for route in args.routes.split(","):
        print(f"running {route} ...", flush=True)
        forwarded = ("epochs", "fast_epochs", "fast_short_epochs", "limit", "test_limit", "raw", "threads")
        argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in forwarded] + [f"--set={o}" for o in args.set]
        out = subprocess.run([sys.executable, __file__, *argv, f"--route={route}"], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{route} failed:\n{out.stderr}")
        results[route] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {[round(r['test_accuracy'], 4) for r in results[route]['epochs']]}", flush=True)

    reference = results.get("reference")
    ref_acc = reference["epochs"][-1]["test_accuracy"] if reference else 0.87
    targets = sorted({round(ref_acc, 4), 0.90, 0.92, 0.93})
    summary = [summarize(r, targets) for r in results.values()]
    by_route = {s["route"]: s for s in summary}
    checks = {}
    if reference:
        ref = by_route["reference"]
        if "project" in by_route:
            p = by_route["project"]
            checks["project/reference throughput"] = f"{p['images_per_s'] / ref['images_per_s']:.2f}× (target ≥ 1.8×)"
            checks["project - reference test accuracy"] = (f"{(p['test_accuracy'] - ref['test_accuracy']) * 100:+.2f} "
                                                           "points (target within ±0.5)")
        for route in ("fast-short", "fast"):
            if route in by_route:
                t = by_route[route]["seconds_to_reach"][f"{round(ref_acc, 4):.4f}"]
                checks[f"{route}: time to the reference's final accuracy / reference elapsed"] = (
                    "not reached" if t is None else f"{t / ref['elapsed_seconds']:.3f} (target ≤ 0.1)")
        if "fast" in by_route:
            t = by_route["fast"]["seconds_to_reach"]["0.9300"]
            checks["fast: time to 93.00% / reference elapsed"] = (
                "not reached" if t is None else f"{t / ref['elapsed_seconds']:.2f} (target ≤ 1)")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, "
               f"{time.strftime('%Y-%m-%d')}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "summary": summary, "checks": checks,
                                                       "raw": results}, indent=2) + "\n")
    table = markdown(summary, checks, machine)
    (args.out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
