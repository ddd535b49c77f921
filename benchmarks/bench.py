"""Benchmark: the tutorial's training loop vs this project's train stage vs the fast recipes.

    python benchmarks/bench.py [--seeds 3] [--device auto|cpu|cuda] [--epochs 10] [--routes ...] [--out DIR]

All routes run in one invocation, on the same machine, data (data/raw/fashion_mnist, from `dvc repro
download`), device and thread count, each seed of each route in its own process so that its peak memory
is its own:

- reference: the tutorial's loop as the tutorial writes it: torchvision's FashionMNIST with per-sample
  PIL transforms (Pad(2), ToTensor), DataLoader(batch_size=64, shuffle=True), the Tudui net, SGD lr 0.01,
  a test pass after every epoch (on a GPU, `.to(device)` per batch, as the tutorial's GPU chapter does);
- project: the train stage's own `fit` with the same model and hyperparameters (params.yaml as committed);
- fast: the fast recipe (benchmarks/fast_recipe.yaml over params.yaml);
- fast-short: the short recipe (benchmarks/fast_short_recipe.yaml over params.yaml), built to pass the
  reference's 10-epoch accuracy as early as it can;
- cifar10 (default on CUDA only): benchmarks/cifar10_recipe.yaml on the real CIFAR-10, fetched from
  data.mirrors in params.yaml (or --cifar-mirror); skipped, with a note, when no copy is reachable.

Every Fashion-MNIST route trains on the same 55,000 images (the project's validation split, seed 0, is
held out) unless its recipe sets train.train_on_val (then all 60,000), and is tested on the 10,000 test
images after every epoch (with train.val_every in its recipe: after those epochs and the last, "—" for the
others). Elapsed times are wall-clock seconds of training plus those test passes; speeds count training
only. Each route runs with seeds 0..N-1 (--seeds: weight init, batch order, augmentation; the split stays
seed 0's); the table gives mean ± standard deviation over them.
After the fast recipe's last epoch its final model is also evaluated as the evaluate stage does, in
float32 and in bfloat16, to compare their accuracy and time. results.json and results.md in --out are
rewritten after every finished run, so an interrupted benchmark keeps what it measured.
"""
from __future__ import annotations

import argparse
import atexit
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RAW = ROOT / "data/raw/fashion_mnist"
RECIPES = Path(__file__).resolve().parent  # the recipe files: <name>.yaml, or <name>.<machine kind>.yaml
PRESETS = {"fast": "fast_recipe.yaml", "fast-short": "fast_short_recipe.yaml", "cifar10": "cifar10_recipe.yaml"}
SPLIT_SEED = 0  # the train/validation split of every route: the project's (params.yaml seed 0)
STARTED = time.perf_counter()  # this process's start: a run's CPU seconds / wall seconds shows the load it met
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")  # the ones these nets' kernels use


def cpu_flags() -> list[str]:
    """The CPU's flags that decide which kernels torch runs (CPU_FLAGS), as /proc/cpuinfo lists them."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    present = set(line.split(":", 1)[1].split())
    return [flag for flag in CPU_FLAGS if flag in present]


def native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def machine_kind(device: torch.device | None = None) -> str:
    """The machine kind results are kept under (benchmarks/results/<kind>/) and recipes are chosen for:
    gpu-<model> on CUDA (gpu-h200), else cpu-bf16 (native bf16: AVX512-BF16 or AMX) or cpu-avx2 (float32
    only), with the core count: each kind keeps only its own figures."""
    if device is not None and device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().split()
        return "gpu-" + next((w for w in name if any(c.isdigit() for c in w)), name[-1])
    isa = "bf16" if native_bf16() else "avx2" if "avx2" in cpu_flags() else "generic"
    return f"cpu-{isa}-{os.cpu_count()}core"


def recipe_file(route: str, kind: str | None = None) -> Path:
    """The route's recipe on this machine kind: benchmarks/<name>.<kind>.yaml where the best recipe there
    differs (measured on that kind), else benchmarks/<name>.yaml."""
    base = RECIPES / PRESETS[route]
    specific = base.with_name(f"{base.stem}.{kind or machine_kind()}.yaml")
    return specific if specific.is_file() else base


def preset(route: str, kind: str | None = None) -> dict:
    """A recipe: {dotted params.yaml key: value}, read as YAML 1.2 as DVC reads params.yaml (5e-4 is a number)."""
    from stages.lib.params import read_yaml

    return read_yaml(recipe_file(route, kind))


def parse_set(text: str) -> tuple[str, object]:
    """--set "train.lr=1e-3" -> ("train.lr", 0.001): the value read as YAML 1.2, as in params.yaml."""
    from ruamel.yaml import YAML, YAMLError
    from stages.lib.params import ParamsError

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ParamsError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    try:
        return key.strip(), YAML(typ="safe", pure=True).load(value)
    except YAMLError as exc:
        raise ParamsError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(exc).split())})") from None


def override_flag(key: str, value) -> str:
    """`-S key=value` for `dvc exp run`, in Hydra's override grammar (what DVC's -S parses): JSON for
    numbers, booleans and lists; a plain string as it is unless Hydra would read it as something else."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if isinstance(value, str):
        parsed = OverridesParser.create().parse_override(f"{key}={value}").value()
        if parsed == value and isinstance(parsed, str):
            return f"-S {key}={value}"
    return f"-S {key}={json.dumps(value, ensure_ascii=False)}"


def project_params(route: str, epochs: int | None, seed: int, device: str, overrides: list[str] = ()):
    """params.yaml, with the route's recipe and then `overrides` ("train.lr=1e-3", YAML 1.2 values) over it.
    A key that does not exist is refused by validate (with a "did you mean")."""
    from stages.lib.params import ParamsError, read_yaml, validate

    params = read_yaml(ROOT / "params.yaml")
    kind = machine_kind(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None
    changes = preset(route, kind) if route in PRESETS else {}
    changes.update(parse_set(o) for o in overrides)
    for key, value in changes.items():
        *path, name = key.split(".")
        section = params
        for part in path:
            section = section.setdefault(part, {})
            if not isinstance(section, dict):
                raise ParamsError(f"{key}: {part} is a value, not a section of params.yaml")
        section[name] = value
    if epochs:
        params["train"]["epochs"] = epochs
    params["seed"], params["train"]["device"] = seed, device
    return validate(params)


def prepared(params, args, raw: Path):
    """The project's preprocess, in memory, with the project's split (seed 0) whatever the training seed:
    ({"train": (x, y) (with the validation images when train.train_on_val), "val": the test split}, meta)."""
    from stages.lib.prepared import training_images
    from stages.lib.datasets import DATASETS
    from stages.preprocess import prepare

    dataset = DATASETS[params.data.dataset]
    splits, meta = prepare(dataset.read(raw, params.preprocess), params.preprocess, SPLIT_SEED)
    pairs = {name: (split["images"], split["labels"]) for name, split in splits.items()}
    x, y = training_images(pairs, params.train.train_on_val)
    tx, ty = pairs["test"]
    return {"train": (x[:args.limit or None], y[:args.limit or None]),
            "val": (tx[:args.test_limit or None], ty[:args.test_limit or None])}, meta


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_project(route: str, epochs: int | None, seed: int, args) -> dict:
    from stages.lib.device import resolve_device, use_bf16
    from stages.lib.training import fit

    device = resolve_device(args.device)
    params = project_params(route, epochs, seed, str(device), args.set if route in PRESETS else ())
    raw = args.cifar_raw if params.data.dataset == "cifar10" else args.raw
    data, meta = prepared(params, args, Path(raw))
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in data.items()}  # resident on the device
    rows, last, last_cpu = [], time.perf_counter(), time.process_time()
    for epoch in fit(params, meta, data, device):  # the test pass has just run (its .item() waited for the GPU)
        sync(device)
        now, cpu = time.perf_counter(), time.process_time()
        rows.append({"epoch": epoch.row["epoch"], "train_seconds": epoch.seconds, "elapsed_seconds": now - last,
                     "cpu_seconds": cpu - last_cpu, "test_accuracy": epoch.row["val_accuracy"], "images": epoch.images})
        last, last_cpu = now, cpu
    out = {"epochs": rows}
    if route == "fast" and (seed == 0 or use_bf16("auto", device)):  # emulated bf16 is slow: seed 0 only
        out["evaluate"] = evaluate_precisions(epoch.model, data["val"], meta, params, device)
    return out


def evaluate_precisions(model, test: tuple, meta: dict, params, device: torch.device) -> dict:
    """The final model on the test split as the evaluate stage runs it (batch evaluate.batch_size,
    channels_last), in float32 and in bfloat16: {precision: {accuracy, seconds}}, and whether this
    device has native bf16 (without it bf16 is emulated: its accuracy counts, its time does not)."""
    from stages.lib.loader import BatchLoader
    from stages.lib.device import use_bf16
    from stages.lib.training import logits_of
    from stages.lib.transforms import Preprocess

    model = model.to(memory_format=torch.channels_last)
    loader = BatchLoader(*test, params.evaluate.batch_size, Preprocess(meta["input_shape"][1:], meta["input_shape"][1:], meta["mean"], meta["std"]).to(device))
    out = {"native_bf16": use_bf16("auto", device), "chosen": "bf16" if use_bf16(params.evaluate.precision, device)
           else "fp32"}
    for precision in ("fp32", "bf16"):
        began = time.perf_counter()
        logits, labels = logits_of(model, loader, bf16=precision == "bf16")
        sync(device)
        accuracy = (logits.argmax(1) == labels).float().mean().item()
        out[precision] = {"accuracy": accuracy, "seconds": round(time.perf_counter() - began, 3)}
    return out


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


def run_reference(epochs: int, seed: int, args) -> dict:
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, Subset

    from stages.lib.device import resolve_device
    from stages.preprocess import carve

    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench-fmnist-"))
    atexit.register(shutil.rmtree, root, True)  # ~55 MB of idx files
    (root / "FashionMNIST/raw").mkdir(parents=True)
    for gz in Path(args.raw).glob("*.gz"):  # torchvision wants the uncompressed idx files
        (root / "FashionMNIST/raw" / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    val_size = project_params("reference", epochs, seed, "cpu").preprocess.val_size
    _, train_idx = carve(60000, val_size, torch.Generator().manual_seed(SPLIT_SEED))  # the project's split
    transform = torchvision.transforms.Compose([torchvision.transforms.Pad(2), torchvision.transforms.ToTensor()])
    train_data = torchvision.datasets.FashionMNIST(str(root), train=True, transform=transform)
    test_data = torchvision.datasets.FashionMNIST(str(root), train=False, transform=transform)
    train_data = Subset(train_data, train_idx[:args.limit or None].tolist())
    test_data = Subset(test_data, range(min(args.test_limit or len(test_data), len(test_data))))

    torch.manual_seed(seed)
    train_dataloader = DataLoader(train_data, batch_size=64, shuffle=True)
    test_dataloader = DataLoader(test_data, batch_size=64)
    tudui = Tudui().to(device)
    loss_fn = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(tudui.parameters(), lr=0.01)
    rows, total_train_step, losses = [], 0, []
    for i in range(epochs):
        began, began_cpu = time.perf_counter(), time.process_time()
        tudui.train()
        for imgs, targets in train_dataloader:
            imgs, targets = imgs.to(device), targets.to(device)
            outputs = tudui(imgs)
            loss = loss_fn(outputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_train_step += 1
            if total_train_step % 100 == 0:
                losses.append(loss.item())  # the tutorial prints it and writes it to TensorBoard
        sync(device)
        trained = time.perf_counter()
        tudui.eval()
        total_accuracy = 0
        with torch.no_grad():
            for imgs, targets in test_dataloader:
                imgs, targets = imgs.to(device), targets.to(device)
                total_accuracy += (tudui(imgs).argmax(1) == targets).sum().item()
        rows.append({"epoch": i + 1, "train_seconds": trained - began, "elapsed_seconds": time.perf_counter() - began,
                     "cpu_seconds": time.process_time() - began_cpu, "test_accuracy": total_accuracy / len(test_data),
                     "images": len(train_data)})
    return {"epochs": rows}


def run_route(route: str, seed: int, args) -> dict:
    """One seed of one route in this process: its per-epoch rows and its peak RSS."""
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    if route == "reference":
        out = run_reference(args.epochs, seed, args)
    elif route == "project":
        out = run_project(route, args.epochs, seed, args)
    else:
        out = run_project(route, {"fast": args.fast_epochs, "fast-short": args.fast_short_epochs}.get(route), seed, args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"route": route, "seed": seed, **out, "peak_rss_mb": usage.ru_maxrss / 1024,
            "process_cpu_seconds": usage.ru_utime + usage.ru_stime, "process_wall_seconds": time.perf_counter() - STARTED}


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarize_run(run: dict, targets: list[float]) -> dict:
    """One seed of one route: totals, final accuracy and the elapsed seconds at which each target was passed."""
    rows = run["epochs"]
    train_seconds = sum(r["train_seconds"] for r in rows)
    elapsed, reached = 0.0, {}
    for row in rows:
        elapsed += row["elapsed_seconds"]
        for target in targets:
            if (row["test_accuracy"] or 0) >= target and target not in reached:  # None: not tested (train.val_every)
                reached[target] = elapsed
    cpu = {"cpu_seconds": sum(r["cpu_seconds"] for r in rows)} if all("cpu_seconds" in r for r in rows) else {}
    return {"seed": run["seed"], "epochs": len(rows), "images_per_s": sum(r["images"] for r in rows) / train_seconds, **cpu,
            "seconds_per_epoch": train_seconds / len(rows), "elapsed_seconds": elapsed,
            "test_accuracy": rows[-1]["test_accuracy"], "accuracy_per_epoch": [r["test_accuracy"] for r in rows],
            "seconds_to_reach": {f"{t:.4f}": reached.get(t) for t in targets}, "peak_rss_mb": run["peak_rss_mb"],
            **({"cpu_use": run["process_cpu_seconds"] / run["process_wall_seconds"]} if "process_cpu_seconds" in run else {}),
            **({"evaluate": run["evaluate"]} if "evaluate" in run else {})}


def summarize(route: str, runs: list[dict], targets: list[float]) -> dict:
    """A route over its seeds: each figure as {mean, sd, min, max}; a target counts as reached only if every
    seed reached it."""
    seeds = [summarize_run(run, targets) for run in runs]
    out = {"route": route, "seeds": [s["seed"] for s in seeds], "epochs": seeds[0]["epochs"], "per_seed": seeds}
    for key in ("images_per_s", "seconds_per_epoch", "elapsed_seconds", "cpu_seconds", "test_accuracy", "peak_rss_mb"):
        if all(key in s for s in seeds):
            out[key] = spread([s[key] for s in seeds])
    out["seconds_to_reach"] = {}
    for t in seeds[0]["seconds_to_reach"]:
        times = [s["seconds_to_reach"][t] for s in seeds]
        out["seconds_to_reach"][t] = None if None in times else spread(times)
    evals = [s["evaluate"] for s in seeds if "evaluate" in s]
    if evals:
        out["evaluate_seeds"] = [s["seed"] for s in seeds if "evaluate" in s]
        out["evaluate"] = {"native_bf16": evals[0]["native_bf16"], "chosen": evals[0]["chosen"],
                           **{p: {k: spread([e[p][k] for e in evals]) for k in ("accuracy", "seconds")}
                              for p in ("fp32", "bf16")}}
    return out


def pm(figure: dict, fmt: str, scale: float = 1.0) -> str:
    """'mean ± sd' of a spread dict."""
    return f"{format(figure['mean'] * scale, fmt)} ± {format(figure['sd'] * scale, fmt)}"


def markdown(summary: list[dict], checks: dict, notes: list[str], machine: str) -> str:
    targets = list(summary[0]["seconds_to_reach"])
    lines = [f"Machine: {machine}", "",
             "Mean ± standard deviation over the seeds; test accuracy in %; min = the worst seed.", "",
             "| route | seeds | epochs | images/s | s/epoch | elapsed s | CPU s | test acc % | min % | " +
             " | ".join(f"s to {float(t):.2%}" for t in targets) + " | peak RSS MB |",
             "|---" * (10 + len(targets)) + "|"]
    for s in summary:
        reach = " | ".join("—" if s["seconds_to_reach"][t] is None else pm(s["seconds_to_reach"][t], ".0f")
                           for t in targets)
        lines.append(f"| {s['route']} | {len(s['seeds'])} | {s['epochs']} | {pm(s['images_per_s'], ',.0f')} | "
                     f"{pm(s['seconds_per_epoch'], '.1f')} | {pm(s['elapsed_seconds'], '.0f')} | "
                     f"{pm(s['cpu_seconds'], '.0f') if 'cpu_seconds' in s else '—'} | "
                     f"{pm(s['test_accuracy'], '.2f', 100)} | {s['test_accuracy']['min']:.2%} | {reach} | "
                     f"{s['peak_rss_mb']['max']:.0f} |")
    threads = machine.split(" threads")[0].rsplit(", ", 1)[-1]
    lines += ["", "Per seed (test accuracy per epoch; elapsed s; CPU use: the process's CPU seconds / wall seconds, "
                  "below its thread count when other jobs took the cores, i.e. measured under contention):", ""]
    for s in summary:
        for run in s["per_seed"]:
            lines.append(f"- {s['route']} seed {run['seed']}: " + ", ".join("—" if a is None else f"{a:.2%}" for a in run["accuracy_per_epoch"])
                         + f" ({run['elapsed_seconds']:.0f} s" + (f"; CPU use {run['cpu_use']:.2f} cores of "
                                                                   f"{threads}" if "cpu_use" in run else "") + ")")
    evals = [s for s in summary if "evaluate" in s]
    if evals:
        e = evals[0]["evaluate"]
        lines += ["", f"Evaluate of the {evals[0]['route']} recipe's final model (seeds "
                      f"{', '.join(map(str, evals[0]['evaluate_seeds']))}), the whole test split "
                      f"(native bf16 here: {'yes' if e['native_bf16'] else 'no, bf16 emulated: its time does not count'}"
                      f"; evaluate.precision picks {e['chosen']}):", "",
                  "| precision | test acc % | seconds |", "|---|---|---|"]
        lines += [f"| {p} | {pm(e[p]['accuracy'], '.2f', 100)} | {pm(e[p]['seconds'], '.2f')} |" for p in ("fp32", "bf16")]
    lines += ["", "Checks:", ""] + [f"- {name}: {value}" for name, value in checks.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


GOALS = {  # issue: the fast recipe's accuracy and time, the short recipe's time to the reference's accuracy
    "fast_mean": 0.94, "fast_worst": 0.938, "fast_ratio": 0.5, "short_ratio": 0.05,
    "stretch_mean": 0.95, "stretch_ratio": 2.0,
}


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def checks_for(by_route: dict, ref_target: float, gpu: bool = False) -> dict:
    """The issue's goals, each against its measured figure (means over the seeds) and met / MISSED; a goal
    whose route did not run, or that needs a GPU this run did not have, says so."""
    checks = {}
    ref = by_route.get("reference")
    key = f"{ref_target:.4f}"
    if ref and "project" in by_route:
        p = by_route["project"]
        checks["project/reference throughput"] = (f"{p['images_per_s']['mean'] / ref['images_per_s']['mean']:.2f}× "
                                                  "(target ≥ 1.8×)")
        checks["project - reference test accuracy"] = (
            f"{(p['test_accuracy']['mean'] - ref['test_accuracy']['mean']) * 100:+.2f} points (target within ±0.5)")
    for route in ("fast-short", "fast"):
        if ref and route in by_route:
            t = by_route[route]["seconds_to_reach"].get(key)
            goal = f" ≤ {GOALS['short_ratio']}" if route == "fast-short" else " ≤ 0.05 (the short recipe's goal)"
            checks[f"{route}: time to the reference's mean final accuracy ({ref_target:.2%}) / reference elapsed"] = (
                "not reached by every seed" + (": MISSED" if route == "fast-short" else "") if t is None else
                f"{t['mean'] / ref['elapsed_seconds']['mean']:.3f} (worst seed {t['max'] / ref['elapsed_seconds']['mean']:.3f};"
                f" target{goal})" + (f": {verdict(t['max'] / ref['elapsed_seconds']['mean'] <= GOALS['short_ratio'])}"
                                     if route == "fast-short" else ""))
    for route, mean_goal, worst_goal, ratio_goal in (("fast", GOALS["fast_mean"], GOALS["fast_worst"], GOALS["fast_ratio"]),
                                                     ("stretch", GOALS["stretch_mean"], None, GOALS["stretch_ratio"])):
        if route not in by_route:
            continue
        f = by_route[route]
        acc = f["test_accuracy"]
        checks[f"{route}: test accuracy, mean of the seeds"] = (f"{acc['mean']:.2%} (target ≥ {mean_goal:.2%}): "
                                                                f"{verdict(acc['mean'] >= mean_goal)}")
        if worst_goal:
            checks[f"{route}: test accuracy, worst seed"] = (f"{acc['min']:.2%} (target ≥ {worst_goal:.2%}): "
                                                             f"{verdict(acc['min'] >= worst_goal)}")
        if ref:
            ratio = f["elapsed_seconds"]["mean"] / ref["elapsed_seconds"]["mean"]
            checks[f"{route}: elapsed / reference elapsed"] = (
                f"{ratio:.2f} (slowest seed {f['elapsed_seconds']['max'] / ref['elapsed_seconds']['mean']:.2f}; "
                f"target ≤ {ratio_goal}): {verdict(ratio <= ratio_goal)}")
            if "cpu_seconds" in f and "cpu_seconds" in ref:  # what a shared machine's load changes least
                cpu_ratio = f["cpu_seconds"]["mean"] / ref["cpu_seconds"]["mean"]
                checks[f"{route}: CPU seconds / reference CPU seconds"] = (
                    f"{cpu_ratio:.2f} (target ≤ {ratio_goal}; with --threads 1 a shared machine's load moves it "
                    "less than elapsed time, with more threads their spinning while a core is taken inflates it): "
                    f"{verdict(cpu_ratio <= ratio_goal)}")
        if "evaluate" in f:
            e = f["evaluate"]
            checks["evaluate: bf16 - fp32 test accuracy"] = (
                f"{(e['bf16']['accuracy']['mean'] - e['fp32']['accuracy']['mean']) * 100:+.3f} points (target within "
                f"±0.05; bf16 {'native' if e['native_bf16'] else 'emulated here, its speed unmeasured'})")
    if "stretch" not in by_route:
        checks["stretch: ≥ 95.00% in ≤ 2× the reference's time"] = "not run (no stretch recipe measured yet)"
    if not gpu:
        checks["GPU: the fast recipe at ≥ 150,000 images/s, 94% in ≤ 5 s of training, the reference's accuracy in "
               "≤ 1/20 of its time on the GPU"] = "unmeasured (no GPU in this run: make bench DEVICE=cuda on one)"
    elif "fast" in by_route:
        f = by_route["fast"]
        checks["GPU: fast images/s"] = (f"{f['images_per_s']['mean']:,.0f} (target ≥ 150,000): "
                                        f"{verdict(f['images_per_s']['mean'] >= 150_000)}")
        t = f["seconds_to_reach"].get("0.9400")
        checks["GPU: fast, elapsed to 94.00% test accuracy"] = (
            "not reached by every seed: MISSED" if t is None else f"{t['mean']:.1f} s (worst seed {t['max']:.1f} s; "
            f"target ≤ 5 s): {verdict(t['max'] <= 5)}")
    if "cifar10" in by_route:
        c = by_route["cifar10"]
        checks["cifar10: test accuracy and elapsed"] = (f"{c['test_accuracy']['mean']:.2%} in "
                                                        f"{c['elapsed_seconds']['mean']:.1f} s (target ≥ 94% in ≤ 5 s "
                                                        "on one H100)")
    return checks


def fetch_cifar(args) -> tuple[Path | None, str]:
    """The CIFAR-10 tarball from --cifar-mirror or data.mirrors (params.yaml), md5-checked, in a temporary
    folder: (its folder, where it came from), or (None, why not). Never the official mirrors: a benchmark
    must not wait on the internet."""
    from stages.lib.datasets import DATASETS
    from stages.lib.errors import PipelineError
    from stages.lib.sources import fetch_file
    from stages.lib.files import md5_file

    data = project_params("cifar10", None, 0, "cpu", args.set).data
    mirrors = [args.cifar_mirror] if args.cifar_mirror else list(data.mirrors)
    if not mirrors:
        return None, "no CIFAR-10 copy: data.mirrors in params.yaml is empty (or pass --cifar-mirror)"
    dataset = DATASETS["cifar10"]
    (name, md5), = dataset.files
    dest = Path(tempfile.mkdtemp(prefix="bench-cifar10-"))
    atexit.register(shutil.rmtree, dest, True)  # ~170 MB
    try:
        source = fetch_file(name, mirrors, dest, data.timeout_s, lambda path: md5_file(path) == (data.md5 or md5), "")
    except PipelineError as exc:
        return None, f"no CIFAR-10 copy reachable through {', '.join(mirrors)} ({exc})"
    return dest, source


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def seed_list(text: str) -> list[int]:
    """"3" -> [0, 1, 2]; "3,4" -> [3, 4]; "2," -> [2]."""
    if "," not in text:
        return list(range(int(text)))
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, default=seed_list("3"),
                        help="N: seeds 0..N-1 for every route; or a list such as 3,4")
    parser.add_argument("--reference-seeds", type=seed_list, default=None,
                        help="the reference route's seeds when they differ from --seeds (e.g. 1 on a busy machine: "
                             "its time is the ratios' denominator, its accuracy the short recipe's target)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the reference and project routes")
    parser.add_argument("--fast-epochs", type=int, default=None, help="epochs of the fast recipe (default: its preset)")
    parser.add_argument("--fast-short-epochs", type=int, default=None, help="epochs of the short recipe (default: its preset)")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (0 = all)")
    parser.add_argument("--test-limit", type=int, default=0, help="test on the first N images only (0 = all)")
    parser.add_argument("--raw", type=Path, default=RAW, help="folder with the four Fashion-MNIST .gz files")
    parser.add_argument("--cifar-mirror", help="folder or http(s) base URL with cifar-10-python.tar.gz "
                                               "(default: data.mirrors in params.yaml)")
    parser.add_argument("--routes", help="comma-separated, of reference,project,fast-short,fast,cifar10 "
                                         "(default: all but cifar10 on a CPU, all on CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipes, e.g. --set train.lr=1e-3 (a params.yaml key, the value read as "
                             "YAML 1.2 as DVC reads params.yaml; repeatable)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--interleave", action="store_true",
                        help="run seed by seed across the routes (for a shared machine: a passing load then "
                             "slows every route alike) instead of route by route")
    parser.add_argument("--out", type=Path, help="where results.json and results.md go (default: "
                                                 "benchmarks/results/<machine kind>/, e.g. cpu-bf16-2core)")
    parser.add_argument("--print-recipe", nargs="?", const="fast", choices=list(PRESETS),
                        help="print a recipe (default: fast) as `dvc exp run` flags")
    parser.add_argument("--rewrite-report", type=Path, metavar="DIR",
                        help="rewrite DIR/results.md and results.json from DIR/results.json's runs (no training)")
    parser.add_argument("--route", help=argparse.SUPPRESS)  # internal: run one route, print its JSON
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # internal: with --route
    parser.add_argument("--cifar-raw", help=argparse.SUPPRESS)  # internal: the fetched CIFAR-10 folder
    args = parser.parse_args()
    from stages.lib.params import ParamsError

    if args.print_recipe:
        kind = machine_kind()
        print(f"{args.print_recipe} recipe for this machine (kind {kind}, flags {' '.join(cpu_flags()) or 'none'}): "
              f"{recipe_file(args.print_recipe, kind).relative_to(ROOT)}", file=sys.stderr)
        recipe = preset(args.print_recipe, kind)
        if args.fast_epochs and args.print_recipe == "fast":  # e.g. 24 on a GPU (docs/benchmarks.md)
            recipe["train.epochs"] = args.fast_epochs
        print(" ".join(override_flag(k, v) for k, v in recipe.items()))
        return
    if args.route:
        print(json.dumps(run_route(args.route, args.seed, args)))
        return
    if args.rewrite_report:  # the same runs, the report's current checks and layout
        saved = json.loads((args.rewrite_report / "results.json").read_text())
        print(write_report(saved["raw"], saved["notes"], saved["machine"], args.rewrite_report))
        return
    try:  # a wrong --set is one line before anything runs
        for route in PRESETS:
            project_params(route, None, 0, "cpu", args.set)
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    if not args.raw.is_dir():
        sys.exit(f"{args.raw} not found: run `dvc repro download` first, or pass --raw")
    from stages.lib.device import resolve_device

    device = resolve_device(args.device)
    routes = (args.routes or "reference,project,fast-short,fast" + (",cifar10" if device.type == "cuda" else "")).split(",")
    unknown = sorted(set(routes) - {"reference", "project", *PRESETS})
    if unknown:
        sys.exit(f"unknown route {', '.join(unknown)}; allowed: reference, project, {', '.join(PRESETS)}")
    notes = []
    if "cifar10" in routes:
        args.cifar_raw, source = fetch_cifar(args)
        if args.cifar_raw is None:
            routes.remove("cifar10")
            notes.append(f"cifar10 skipped: {source}")
        else:
            notes.append(f"cifar10: the real CIFAR-10 from {source}")
        print(notes[-1], flush=True)

    kind = machine_kind(device)
    args.out = args.out or Path(__file__).with_name("results") / kind
    machine = (f"{cpu_name()} (kind {kind}; flags {' '.join(cpu_flags()) or 'none of ' + ' '.join(CPU_FLAGS)}), "
               f"{os.cpu_count()} cores, {args.threads} threads, "
               f"native bf16: {'yes' if native_bf16() else 'no'}, torch {torch.__version__}, "
               f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
               f"{time.strftime('%Y-%m-%d %H:%M')}, recipes "
               f"{', '.join(recipe_file(r, kind).name for r in routes if r in PRESETS) or 'none'}, "
               f"load average before {os.getloadavg()[0]:.1f}")
    results: dict[str, list[dict]] = {}
    if not routes or not args.seeds:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    # --interleave: seed by seed (reference 0, fast 0, reference 1, ...), so that a load that comes and goes
    # on a shared machine falls on every route alike; the default runs route by route
    seeds_of = {r: args.reference_seeds if r == "reference" and args.reference_seeds is not None else args.seeds
                for r in routes}
    every_seed = sorted(set().union(*seeds_of.values()))
    order = ([(r, s) for s in every_seed for r in routes if s in seeds_of[r]] if args.interleave else
             [(r, s) for r in routes for s in seeds_of[r]])
    for route, seed in order:
        print(f"running {route} seed {seed} ...", flush=True)
        forwarded = ("epochs", "fast_epochs", "fast_short_epochs", "limit", "test_limit", "raw", "threads", "device",
                     "cifar_raw")
        argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in forwarded if getattr(args, k) is not None]
        argv += [f"--set={o}" for o in args.set]
        out = subprocess.run([sys.executable, __file__, *argv, f"--route={route}", f"--seed={seed}"],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{route} seed {seed} failed:\n{out.stderr}")
        results.setdefault(route, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        run = results[route][-1]
        tested = [None if r["test_accuracy"] is None else round(r["test_accuracy"], 4) for r in run["epochs"]]
        print(f"  {tested} {sum(r['elapsed_seconds'] for r in run['epochs']):.1f} s", flush=True)
        table = write_report(results, notes, machine + f", after {os.getloadavg()[0]:.1f}", args.out)
    print(table)


def write_report(results: dict, notes: list[str], machine: str, out: Path) -> str:
    """results.json and results.md in `out` from the runs so far (also --rewrite-report: from results.json's)."""
    reference = results.get("reference")
    ref_acc = statistics.fmean(r["epochs"][-1]["test_accuracy"] for r in reference) if reference else 0.87
    ref_target = round(ref_acc, 4)
    targets = sorted({ref_target, 0.90, 0.92, 0.93, 0.94})
    summary = [summarize(route, runs, targets) for route, runs in results.items()]
    checks = checks_for({s["route"]: s for s in summary}, ref_target, gpu=", device cuda" in machine)
    (out / "results.json").write_text(json.dumps({"machine": machine, "summary": summary, "checks": checks,
                                                  "notes": notes, "raw": results}, indent=2) + "\n")
    table = markdown(summary, checks, notes, machine)
    (out / "results.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
