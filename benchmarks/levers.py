"""Levers of the fast recipe, measured before they go into a recipe or the training code
(benchmarks/results/<machine kind>/levers.md has what each gained or cost):

    python benchmarks/levers.py [--set KEY=VALUE ...] [--seed 0] [--threads 1] [--cutout N] [--sizes 20,...,28]
                                [--net-options JSON] [--whiten-trained]
    python benchmarks/levers.py --compile-probe fast_cnn6 [--precision bf16|fp32] [--batch-size 128] [--net-options JSON]

The first trains the fast recipe (benchmarks/fast_recipe.yaml, --set on top) through the project's own `fit`,
optionally with cutout patched into the loader's augmentation, progressive resizing (--sizes: the training
images' side epoch by epoch), the net's options changed (--net-options
'{"widths": [48, 96, 192]}' or '{"identity_init": false}' over those of the recipe's net in stages/lib/nets.py)
or its first conv whitening and then trained on (--whiten-trained; `--set model.whiten=true` keeps it fixed),
and then tests its final model under several test-time augmentations (plain, flip, flip + translate by one
pixel). The second times one net's SGD steps and inference eagerly and under torch.compile (inductor), compile
time included. Both print one JSON line; times are CPU seconds of this process (time.process_time) besides wall
seconds, since a shared machine's load moves wall seconds far more than CPU seconds (with one thread; compile
workers' CPU time is not counted)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def patch_cutout(size: int) -> None:
    from stages.lib import loader

    original = loader.make_augmenter

    def make_augmenter(crop, flip, generator):
        base = original(crop, flip, generator)

        def augment(images):
            images = base(images) if base else images
            n, c, h, w = images.shape
            cy, cx = torch.randint(0, h, (2, n, 1), generator=generator)
            keep = torch.rand(n, generator=generator) < 0.5
            rows = (torch.arange(h).view(1, h) - cy).abs() <= size // 2  # n×h
            cols = (torch.arange(w).view(1, w) - cx).abs() <= size // 2
            hole = (rows.view(n, 1, h, 1) & cols.view(n, 1, 1, w)) & ~keep.view(n, 1, 1, 1)
            return images.masked_fill(hole, 0)

        return augment

    loader.make_augmenter = make_augmenter


def patch_sizes(sizes: list[int]) -> None:
    """Progressive resizing: the loader's k-th pass (epoch k+1) scales its batches to sizes[k]×sizes[k]
    (bilinear, antialiased; the last size for passes beyond the list). The nets pool globally, so any size runs."""
    from stages.lib import loader

    original = loader.BatchLoader.__iter__

    def __iter__(self):
        size = sizes[min(getattr(self, "passes", 0), len(sizes) - 1)] if self.augment else None
        self.passes = getattr(self, "passes", 0) + 1
        for images, labels in original(self):
            if size and size != images.shape[-1]:
                images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels

    loader.BatchLoader.__iter__ = __iter__


def patch_whiten_trained() -> None:
    """model.whiten, but the first conv is trained on from its whitening start instead of kept fixed."""
    from stages.lib import training
    from stages.lib.nets import plain_net

    whiten = training.whiten_first_conv

    def whiten_then_train(model, name, images):
        whiten(model, name, images)
        plain_net(model).features[0].requires_grad_(True)

    training.whiten_first_conv = whiten_then_train


def patch_net_options(name: str, changes: dict) -> None:
    """MODELS[name] builds with `changes` over its own options (a lever on the net's shape or init)."""
    import dataclasses
    from stages.lib import nets

    entry = nets.MODELS[name]
    nets.MODELS[name] = dataclasses.replace(entry, options=lambda shape: {**entry.options(shape), **changes})


def shift(x, dy, dx):
    h, w = x.shape[2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


@torch.inference_mode()
def tta_scores(model, test, meta, params, bf16):
    from stages.lib.nets import ViewAveraged, plain_net
    from stages.lib.transforms import Preprocess

    net = plain_net(model)
    net.eval()
    flip, flip_translate = ViewAveraged(net).eval(), ViewAveraged(net, translate=True).eval()  # the model's own TTA
    shape = meta["input_shape"][1:]
    norm = Preprocess(shape, shape, meta["mean"], meta["std"])
    x, y = test
    views = {
        "plain": lambda b: net(b),
        "flip": flip,
        "flip+translate": flip_translate,
        "flip+translate4": lambda b: 0.5 * flip(b) + 0.125 * sum(
            flip(s) for s in (shift(b, 1, 0), shift(b, -1, 0), shift(b, 0, 1), shift(b, 0, -1))),
    }
    out = {}
    for name, f in views.items():
        t0, c0, correct = time.perf_counter(), time.process_time(), 0
        for i in range(0, len(y), 1000):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = f(norm(x[i:i + 1000]).contiguous(memory_format=torch.channels_last)).float()
            correct += (logits.argmax(1) == y[i:i + 1000]).sum().item()
        out[name] = {"acc": correct / len(y), "cpu_s": round(time.process_time() - c0, 2),
                     "wall_s": round(time.perf_counter() - t0, 2)}
    return out


def compile_probe(name: str, precision: str, batch_size: int, steps: int = 60) -> dict:
    """CPU seconds per image of SGD steps (batch_size random 28×28 images) and of inference (1000 a batch), eager
    and under torch.compile; warmup = the first two steps or passes (compiling, for torch.compile)."""
    from torch import nn
    from stages.lib.nets import build_model, model_config

    out = {"net": name, "precision": precision, "batch_size": batch_size, "threads": torch.get_num_threads()}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        model = build_model(model_config(name, [1, 28, 28], 10)).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
        x = torch.randn(batch_size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch_size,))
        run = torch.compile(model) if mode == "compile" else model
        bf16 = precision == "bf16"

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(run(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        c = time.process_time()
        step(), step()
        warm = time.process_time() - c
        c = time.process_time()
        for _ in range(steps):
            step()
        train = steps * batch_size / (time.process_time() - c)
        model.eval()
        xe = torch.randn(1000, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            c = time.process_time()
            run(xe), run(xe)
            eval_warm = time.process_time() - c
            c = time.process_time()
            for _ in range(5):
                run(xe)
            infer = 5000 / (time.process_time() - c)
        out[mode] = {"train_images_per_cpu_s": round(train), "train_warmup_cpu_s": round(warm, 1),
                     "eval_images_per_cpu_s": round(infer), "eval_warmup_cpu_s": round(eval_warm, 1)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-probe", metavar="NET", help="time NET eager vs torch.compile instead of training")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cutout", type=int, default=0)
    p.add_argument("--sizes", type=lambda t: [int(v) for v in t.split(",")], default=[],
                   help="progressive resizing: the training images' side per epoch, e.g. 20,20,24,28")
    p.add_argument("--net-options", type=json.loads, default={}, help="JSON over the recipe's net's options")
    p.add_argument("--whiten-trained", action="store_true", help="model.whiten, the first conv trained on")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--raw", default="/usr/share/datasets/fashion-mnist")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.compile_probe:
        if a.net_options:
            patch_net_options(a.compile_probe, a.net_options)
        print(json.dumps(compile_probe(a.compile_probe, a.precision, a.batch_size)))
        return
    if a.cutout:
        patch_cutout(a.cutout)
    if a.sizes:
        patch_sizes(a.sizes)
    import bench
    from stages.lib.device import use_bf16
    from stages.lib.training import fit

    if a.recipe != "fast":
        bench.PRESETS[a.recipe] = a.recipe
    params = bench.project_params(a.recipe, None, a.seed, "cpu", a.set + ["model.whiten=true"] * a.whiten_trained)
    if a.net_options:
        patch_net_options(params.model.name, a.net_options)
    if a.whiten_trained:
        patch_whiten_trained()
    args = argparse.Namespace(limit=0, test_limit=0)
    data, meta = bench.prepared(params, args, Path(a.raw))
    rows, t0, c0 = [], time.perf_counter(), time.process_time()
    for epoch in fit(params, meta, data, torch.device("cpu")):
        rows.append({"epoch": epoch.row["epoch"], "acc": epoch.row["val_accuracy"],
                     "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                     "train_s": round(epoch.seconds, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    bf16 = use_bf16(params.train.precision, torch.device("cpu"))
    print(json.dumps({"set": a.set, "cutout": a.cutout, "sizes": a.sizes, "net_options": a.net_options,
                      "whiten_trained": a.whiten_trained, "seed": a.seed, "epochs": rows,
                      "tta": tta_scores(epoch.model, data["val"], meta, params, bf16)}))


if __name__ == "__main__":
    main()
