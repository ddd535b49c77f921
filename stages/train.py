"""Stage 3 — train: the tutorial's training loop on the prepared tensors (CUDA when available).

Writes models/model.pt (the self-describing model file, stages/lib/modelfile.py), models/checkpoint.pt
after every epoch (a rerun resumes from it when the settings still match), TensorBoard logs in logs/,
and after every epoch, so that `dvc exp show` and `dvc plots` follow a running experiment:
metrics/train.json (validation and training loss), metrics/train_history.csv (per-epoch curves),
metrics/train_time.json (speed, kept apart so that the other files are identical across reruns) and
metrics/train_env.json (device, precision, threads: not metrics). A training that fails with an error
or Ctrl-C puts the old metrics files back, so they describe models/model.pt (after a SIGKILL they hold
the killed run's epochs until the rerun resumes from the checkpoint).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from stages.lib import distributed, faults
from stages.lib.data import load_meta, load_split, training_images
from stages.lib.distributed import SINGLE, Group
from stages.lib.engine import (WeightAverage, evaluate, learning_rate, resolve_device, set_threads, train_one_epoch,
                               use_bf16)
from stages.lib.errors import PipelineError, run
from stages.lib.files import atomic_path, clear_temps, csv_bytes, json_bytes, torch_bytes, write_files
from stages.lib.loader import BatchLoader, make_normalizer, steps_per_epoch
from stages.lib.modelfile import FORMAT, ModelFile, read_torch_file
from stages.lib.models import build_model, freeze_backbone, imagenet_weights_path, model_config
from stages.lib.params import Params, load_params
from stages.lib.tracking import RUN_FILE, Tracker

MODEL_PATH, CHECKPOINT_PATH = Path("models/model.pt"), Path("models/checkpoint.pt")
LOG_DIR = Path("logs")
METRICS_PATH, HISTORY_PATH = Path("metrics/train.json"), Path("metrics/train_history.csv")
TIME_PATH = Path("metrics/train_time.json")
ENV_PATH = Path("metrics/train_env.json")  # where it ran (device, precision, threads): not a metric
EVAL_BATCH = 1000  # validation images per forward pass


def fingerprint(params: Params, meta: dict) -> str:
    """What a resumed run must share with the checkpoint: everything that shapes the weights except
    where/how it is logged, how many processes share the work and, with a constant lr, the epoch count
    (more epochs continue the same run; a onecycle schedule is fitted to its epoch count, so there it counts)."""
    ignored = {"device", "log_every", "nproc"} | ({"epochs"} if params.train.schedule == "constant" else set())
    keyed = {"seed": params.seed, "model": params.model.model_dump(), "train": params.train.model_dump(exclude=ignored),
             "data": meta["sha256"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def try_resume(path: Path, expect: str, epochs: int, print_fn=print) -> dict | None:
    """The checkpoint to continue from, or None (with the reason printed) to start over."""
    if not path.exists():
        return None
    try:
        ckpt = read_torch_file(path)
    except PipelineError as exc:
        print_fn(f"{exc}: starting over")
        return None
    if ckpt.get("fingerprint") != expect:
        print_fn(f"{path} was trained with other settings or data: starting over")
        return None
    if ckpt["epoch"] >= epochs:
        print_fn(f"{path} already has {ckpt['epoch']} epochs (asked for {epochs}): starting over")
        return None
    print_fn(f"resuming from {path} after epoch {ckpt['epoch']}")
    return ckpt


@dataclass
class Callbacks:
    """What fit reports as it goes; on rank 0 only in a process group."""
    on_step: Callable[[int, torch.Tensor], None] = lambda step, loss: None           # after SGD step `step` (1-based)
    on_epoch: Callable[[dict, float, dict], None] = lambda row, seconds, checkpoint: None  # after each epoch
    print: Callable = partial(print, flush=True)


QUIET = Callbacks(print=lambda *args, **kwargs: None)


@dataclass
class FitResult:
    model: nn.Module            # what validation, evaluate and export use: the weight average when train.ema is on
    history: list[dict]         # one row per epoch: train_loss, val_loss, val_accuracy
    checkpoint: dict            # the resume state after the last epoch
    epoch_seconds: list[float] = field(default_factory=list)  # training time of each epoch run in this call


def fit(params: Params, meta: dict, data: dict, device: torch.device, resume: dict | None = None,
        callbacks: Callbacks = Callbacks(), group: Group = SINGLE) -> FitResult:
    """Train the configured model on data = {"train": (images, labels), "val": (...)}, from scratch or
    from a `resume` checkpoint. With model.pretrained the net starts from ImageNet weights (not read on
    resume: the checkpoint has all weights); with model.freeze_backbone only its last layer is trained.
    In a process group (stages.lib.distributed) every rank calls fit with the same arguments."""
    cfg = params.train
    torch.manual_seed(params.seed)
    config = model_config(params.model.name, meta["input_shape"], len(meta["classes"]), params.model.tta_flip)
    model = build_model(config, pretrained=params.model.pretrained and not resume)
    if params.model.freeze_backbone:
        freeze_backbone(model, config["name"])
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    average = WeightAverage(model, cfg.ema) if cfg.ema else None
    normalize = make_normalizer(meta["mean"], meta["std"], device)
    loader = BatchLoader(*data["train"], cfg.batch_size, normalize, seed=params.seed, crop=cfg.augment_crop,
                         flip=cfg.augment_flip, group=group)
    val_x, val_y = data["val"]
    val_loader = BatchLoader(val_x[group.rank::group.world], val_y[group.rank::group.world], EVAL_BATCH, normalize)
    bf16 = use_bf16(cfg.precision, device)
    history, start_epoch = [], 0
    if resume:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if average:
            average.load_state_dict(resume["average"])
        loader.load_state_dict(resume)
        torch.set_rng_state(resume["torch_rng"])
        history, start_epoch = list(resume["history"]), resume["epoch"]
    trained = model
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    final_model = average.model if average else model
    total_steps, step = cfg.epochs * len(loader), start_epoch * len(loader)

    def set_lr():
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate(step, total_steps, cfg.lr, cfg.schedule, cfg.warmup)

    def after_step(loss):
        nonlocal step
        step += 1
        set_lr()
        if average:
            average.update()
        callbacks.on_step(step, loss)

    set_lr()
    epoch_seconds = []
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        began = time.perf_counter()
        batches = tqdm(loader, unit="batch", desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                       disable=None if group.main else True, mininterval=1.0)
        loss_sum, seen = train_one_epoch(trained, batches, optimizer, loss_fn, bf16, after_step)
        loss_sum, seen = group.sum(loss_sum, seen, device=val_y.device)
        train_loss = loss_sum / seen
        if train_loss != train_loss or train_loss == float("inf"):
            raise PipelineError(f"training diverged (mean loss {train_loss}); lower train.lr")
        seconds = time.perf_counter() - began
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the evaluate stage uses fp32
            val = validate(final_model, val_loader, group)
        epoch_seconds.append(seconds)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["loss"], 6),
               "val_accuracy": round(val["accuracy"], 6)}
        history.append(row)
        callbacks.print(f"epoch {epoch}/{cfg.epochs}  train_loss {train_loss:.4f}  val_loss {val['loss']:.4f}  "
                        f"val_acc {val['accuracy']:.4f}  {seconds:.1f}s  {len(loader.labels) / seconds:,.0f} img/s")
        ckpt = {"format": FORMAT, "model": config, "state_dict": cpu_state(model), "epoch": epoch,
                "history": history, "optimizer": optimizer.state_dict(), **loader.state_dict(),
                "torch_rng": torch.get_rng_state()}
        if average:
            ckpt["average"] = average.state_dict()
        callbacks.on_epoch(row, seconds, ckpt)
    return FitResult(final_model, history, ckpt, epoch_seconds)


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def validate(model: nn.Module, loader: BatchLoader, group: Group) -> dict:
    """Loss and accuracy on the validation split; in a process group each rank has its share (the
    loader holds images[rank::world]) and the sums are all-reduced."""
    mine = evaluate(model, loader)
    if group.world == 1:
        return mine
    n = len(loader.labels)
    loss_sum, correct, count = group.sum(mine["loss"] * n, round(mine["accuracy"] * n), n, device=loader.labels.device)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def save_checkpoint(ckpt: dict) -> None:
    with atomic_path(CHECKPOINT_PATH) as tmp:
        tmp.write_bytes(torch_bytes(ckpt))
        faults.at("checkpoint", ckpt["epoch"])


def main(args) -> None:
    params = load_params()
    meta = load_meta()
    if params.train.nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(params.train.nproc, ["--debug"] if args.debug else []))
    group, device_name = distributed.init(params.train.device)
    try:
        train_stage(params, meta, group, resolve_device(device_name))
    finally:
        distributed.finish(group)


def metrics_files(history: list[dict], epoch_seconds: list[float], n_train: int, env: dict) -> dict:
    """{path: bytes} of the metrics after the epochs in `history` (rewritten after every epoch, so that
    `dvc exp show` and `dvc plots` follow a running experiment)."""
    total = sum(epoch_seconds)
    return {METRICS_PATH: json_bytes({"epochs": len(history), **{k: v for k, v in history[-1].items() if k != "epoch"}}),
            HISTORY_PATH: csv_bytes(history),
            TIME_PATH: json_bytes({"seconds": round(total, 2),
                                   "images_per_s": round(n_train * len(epoch_seconds) / total, 1)}),
            ENV_PATH: json_bytes(env)}


def train_stage(params: Params, meta: dict, group: Group, device: torch.device) -> None:
    threads = set_threads(params.threads, group.local_world)
    data = {name: load_split(name, device=device) for name in ("train", "val")}
    data["train"] = training_images(data, params.train.train_on_val)
    expect = fingerprint(params, meta)
    resume = try_resume(CHECKPOINT_PATH, expect, params.train.epochs, print if group.main else QUIET.print)
    if resume is None and params.model.pretrained:
        imagenet_weights_path(params.model.name)  # missing weights fail here, before anything is written
    if not group.main:  # the other ranks train along and write nothing
        fit(params, meta, data, device, resume, Callbacks(lambda step, loss: faults.at("step", step), print=QUIET.print),
            group=group)
        return
    live = (METRICS_PATH, HISTORY_PATH, TIME_PATH, ENV_PATH)
    clear_temps(MODEL_PATH, CHECKPOINT_PATH, RUN_FILE, *live)
    before = {path: path.read_bytes() if path.is_file() else None for path in live}  # put back if training fails
    new_folders = [folder for folder in {path.parent for path in live} if not folder.exists()]
    if resume is None:
        shutil.rmtree(LOG_DIR, ignore_errors=True)
    from torch.utils.tensorboard import SummaryWriter

    n_train = len(data["train"][1])
    steps = steps_per_epoch(n_train, params.train.batch_size, group.world)
    writer = SummaryWriter(str(LOG_DIR), purge_step=resume["epoch"] * steps + 1 if resume else None)
    env = {"device": str(device), "precision": "bf16" if use_bf16(params.train.precision, device) else "fp32",
           "threads": threads, "processes": group.world}
    tracker = Tracker.start(params.tracking, params, env, meta, resume.get("mlflow_run_id") if resume else None)
    ranks = f", {group.world} processes" if group.world > 1 else ""
    print(f"training {params.model.name} on {device} ({threads} threads{ranks}, {env['precision']}), "
          f"{n_train} train / {len(data['val'][1])} val images")
    if resume is None:
        writer.add_images("train/batch", data["train"][0][:64].float().div(255), 0)
    epoch_seconds = []

    def on_step(step, loss):
        if step % params.train.log_every == 0:
            writer.add_scalar("train/loss", loss.item(), step)
        faults.at("step", step)

    def on_epoch(row, seconds, ckpt):
        writer.add_scalar("val/loss", row["val_loss"], row["epoch"])
        writer.add_scalar("val/accuracy", row["val_accuracy"], row["epoch"])
        writer.add_scalar("train/epoch_loss", row["train_loss"], row["epoch"])
        tracker.log_epoch(row, seconds, n_train)
        save_checkpoint({**ckpt, "fingerprint": expect, "mlflow_run_id": tracker.run_id})
        epoch_seconds.append(seconds)
        write_files(metrics_files(ckpt["history"], epoch_seconds, n_train, env))

    try:
        result = fit(params, meta, data, device, resume, Callbacks(on_step, on_epoch), group=group)
    except BaseException as exc:
        write_files({path: content for path, content in before.items() if content is not None})
        for path in (path for path, content in before.items() if content is None):
            path.unlink(missing_ok=True)
        for folder in new_folders:
            with contextlib.suppress(OSError):  # left alone if anything else was written there
                folder.rmdir()
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if resume is None:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(result.model, torch.zeros(1, *meta["input_shape"], device=device))
    writer.close()

    final = ModelFile(config=result.checkpoint["model"], epoch=result.checkpoint["epoch"],
                      state_dict=cpu_state(result.model), classes=meta["classes"],
                      normalization={"mean": meta["mean"], "std": meta["std"]}, input=meta["input"],
                      params=params.model_dump(), dataset=meta["dataset"], val_metrics=result.history[-1])
    write_files({MODEL_PATH: final.to_bytes(), RUN_FILE: json_bytes(tracker.record()),
                 **metrics_files(result.history, result.epoch_seconds, n_train, env)})
    for path in live:
        tracker.log_artifact(path, "metrics")
    tracker.log_artifact(LOG_DIR, "tensorboard")
    tracker.finish()
    print(f"wrote {MODEL_PATH} (val accuracy {result.history[-1]['val_accuracy']:.4f}), {METRICS_PATH}, "
          f"logs in {LOG_DIR}/" + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
