"""Stage 3 — train: the tutorial's training loop on the prepared tensors (CUDA when available).

Writes models/model.pt (a self-describing model file), models/checkpoint.pt after every epoch (a rerun
resumes from it when the settings still match), TensorBoard logs in logs/, metrics/train.json (final
validation metrics), metrics/train_history.csv (per-epoch curves for `dvc plots`) and
metrics/train_time.json (speed; kept apart so the other metrics files are identical across reruns).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from stages import distributed, faults
from stages.checkpoint import FORMAT, load_checkpoint
from stages.data import load_meta, load_split
from stages.distributed import SINGLE, Group
from stages.engine import (WeightAverage, evaluate, learning_rate, make_augmenter, make_normalizer, resolve_device,
                           set_threads, train_one_epoch, use_bf16)
from stages.errors import PipelineError, run
from stages.files import atomic_path, clear_temps, json_bytes, torch_bytes, write_files
from stages.models import build_model, freeze_backbone, imagenet_weights_path, model_config
from stages.params import load_params
from stages.tracking import RUN_FILE, Tracker

MODEL_PATH, CHECKPOINT_PATH = Path("models/model.pt"), Path("models/checkpoint.pt")
LOG_DIR = Path("logs")
METRICS_PATH, HISTORY_PATH = Path("metrics/train.json"), Path("metrics/train_history.csv")
TIME_PATH = Path("metrics/train_time.json")
EVAL_BATCH = 1000


def fingerprint(params: dict, meta: dict) -> str:
    """What a resumed run must share with the checkpoint: everything that shapes the weights except
    where/how it is logged, how many processes share the work and, with a constant lr, the epoch count
    (more epochs continue the same run; a onecycle schedule is fitted to its epoch count, so there it counts)."""
    ignored = ("device", "log_every", "nproc") + (("epochs",) if params["train"]["schedule"] == "constant" else ())
    train = {k: v for k, v in params["train"].items() if k not in ignored}
    keyed = {"seed": params["seed"], "model": params["model"], "train": train, "data": meta["sha256"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def try_resume(path: Path, expect: str, epochs: int, print_fn=print) -> dict | None:
    """The checkpoint to continue from, or None (with the reason printed) to start over."""
    if not path.exists():
        return None
    try:
        ckpt = load_checkpoint(path)
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


def fit(params: dict, meta: dict, data: dict, device: torch.device, resume: dict | None = None,
        on_step=None, on_epoch=None, save_checkpoint=None, print_fn=partial(print, flush=True),
        group: Group = SINGLE):
    """Train the configured model; returns (model, history, checkpoint dict of the last epoch, seconds),
    where model is the weight average when train.ema is on (the one validated each epoch).

    on_step(global_step, loss) runs after every SGD step, on_epoch(history_row, seconds) after every
    epoch, save_checkpoint(checkpoint) after every epoch's validation. With model.pretrained the net
    starts from ImageNet weights (not read on resume: the checkpoint has all weights); with
    model.freeze_backbone only its last layer is trained. In a process group (see stages.distributed)
    every rank calls fit with the same arguments; pass the callbacks on rank 0 only."""
    cfg, model_cfg = params["train"], params["model"]
    torch.manual_seed(params["seed"])
    config = model_config(model_cfg["name"], meta["input_shape"], len(meta["classes"]), model_cfg["tta_flip"])
    model = build_model(config, pretrained=model_cfg["pretrained"] and not resume)
    if model_cfg["freeze_backbone"]:
        freeze_backbone(model, config["name"])
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"],
                                momentum=cfg["momentum"], nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    average = WeightAverage(model, cfg["ema"]) if cfg["ema"] else None
    shuffle = torch.Generator().manual_seed(params["seed"])
    augment_rng = torch.Generator().manual_seed(params["seed"] + 1)  # a stream apart from the shuffle's
    augment = make_augmenter(cfg["augment_crop"], cfg["augment_flip"], augment_rng)
    normalize = make_normalizer(meta["mean"], meta["std"], device)
    bf16 = use_bf16(cfg["precision"], device)
    (train_x, train_y), (val_x, val_y) = data["train"], data["val"]
    history, start_epoch = [], 0
    if resume:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if average:
            average.load_state_dict(resume["average"])
        shuffle.set_state(resume["shuffle_rng"])
        augment_rng.set_state(resume["augment_rng"])
        torch.set_rng_state(resume["torch_rng"])
        history, start_epoch = list(resume["history"]), resume["epoch"]
    trained = model
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = -(-len(train_y) // cfg["batch_size"])
    total_steps = cfg["epochs"] * steps_per_epoch
    final_model = average.model if average else model  # what validation, evaluate and export see
    epoch_seconds = []
    for epoch in range(start_epoch + 1, cfg["epochs"] + 1):
        base = (epoch - 1) * steps_per_epoch
        step_hook = (lambda step, loss, base=base: on_step(base + step + 1, loss)) if on_step else None

        def lr_at(step, base=base):
            return learning_rate(base + step, total_steps, cfg["lr"], cfg["schedule"], cfg["warmup"])

        began = time.perf_counter()
        with tqdm(total=len(train_y), unit="img", desc=f"epoch {epoch}/{cfg['epochs']}", leave=False,
                  disable=None if group.main else True, mininterval=1.0) as bar:
            train_loss = train_one_epoch(trained, optimizer, loss_fn, train_x, train_y, normalize, cfg["batch_size"],
                                         shuffle, step_hook, bar, augment, lr_at, average, bf16, group)
        seconds = time.perf_counter() - began
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the evaluate stage uses fp32
            val = validate(final_model, val_x, val_y, normalize, group)
        epoch_seconds.append(seconds)
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": round(val["loss"], 6),
               "val_accuracy": round(val["accuracy"], 6)}
        history.append(row)
        print_fn(f"epoch {epoch}/{cfg['epochs']}  train_loss {train_loss:.4f}  val_loss {val['loss']:.4f}  "
                 f"val_acc {val['accuracy']:.4f}  {seconds:.1f}s  {len(train_y) / seconds:,.0f} img/s")
        if on_epoch:
            on_epoch(row, seconds)
        ckpt = {"format": FORMAT, "model": config,
                "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                "epoch": epoch, "history": history, "optimizer": optimizer.state_dict(),
                "shuffle_rng": shuffle.get_state(), "augment_rng": augment_rng.get_state(),
                "torch_rng": torch.get_rng_state()}
        if average:
            ckpt["average"] = average.state_dict()
        if save_checkpoint:
            save_checkpoint(ckpt)
    return final_model, history, ckpt, epoch_seconds


def validate(model, images, labels, normalize, group: Group) -> dict:
    """Loss and accuracy on the validation split; in a process group each rank takes its share and the
    sums are all-reduced."""
    if group.world == 1:
        return evaluate(model, images, labels, normalize, EVAL_BATCH)
    images, labels = images[group.rank::group.world], labels[group.rank::group.world]
    mine = evaluate(model, images, labels, normalize, EVAL_BATCH)
    n = len(labels)
    loss_sum, correct, count = group.sum(mine["loss"] * n, round(mine["accuracy"] * n), n, device=labels.device)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def history_csv(history: list[dict]) -> bytes:
    buffer = io.StringIO()
    csv_writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    csv_writer.writeheader()
    csv_writer.writerows(history)
    return buffer.getvalue().encode()


def main(args) -> None:
    params = load_params()
    meta = load_meta()
    nproc = params["train"]["nproc"]
    if nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(nproc, ["--debug"] if args.debug else []))
    group, device_name = distributed.init(params["train"]["device"])
    try:
        train_stage(params, meta, group, resolve_device(device_name))
    finally:
        distributed.finish(group)


def save_checkpoint(ckpt: dict) -> None:
    with atomic_path(CHECKPOINT_PATH) as tmp:
        tmp.write_bytes(torch_bytes(ckpt))
        faults.at("checkpoint", ckpt["epoch"])


def train_stage(params: dict, meta: dict, group: Group, device: torch.device) -> None:
    threads = set_threads(params["threads"], group.local_world)
    data = {name: load_split(name, device=device) for name in ("train", "val")}
    n_train, log_every = len(data["train"][1]), params["train"]["log_every"]
    expect = fingerprint(params, meta)
    resume = try_resume(CHECKPOINT_PATH, expect, params["train"]["epochs"], print if group.main else print_nothing)
    if resume is None and params["model"]["pretrained"]:
        imagenet_weights_path(params["model"]["name"])  # missing weights fail here, before anything is written

    def on_any_step(step, loss):
        faults.at("step", step)

    if not group.main:  # the other ranks train along and write nothing
        fit(params, meta, data, device, resume, on_any_step, print_fn=print_nothing, group=group)
        return
    clear_temps(MODEL_PATH, CHECKPOINT_PATH, RUN_FILE, METRICS_PATH, HISTORY_PATH, TIME_PATH)
    if resume is None:
        shutil.rmtree(LOG_DIR, ignore_errors=True)
    from torch.utils.tensorboard import SummaryWriter

    steps = -(-n_train // params["train"]["batch_size"])
    writer = SummaryWriter(str(LOG_DIR), purge_step=resume["epoch"] * steps + 1 if resume else None)
    tracker = Tracker.start(params["tracking"], params, str(device), resume.get("mlflow_run_id") if resume else None)
    precision = "bf16" if use_bf16(params["train"]["precision"], device) else "fp32"
    ranks = f", {group.world} processes" if group.world > 1 else ""
    print(f"training {params['model']['name']} on {device} ({threads} threads{ranks}, {precision}), "
          f"{n_train} train / {len(data['val'][1])} val images")
    if resume is None:
        writer.add_images("train/batch", data["train"][0][:64].float().div(255), 0)

    def on_step(step, loss):
        if step % log_every == 0:
            writer.add_scalar("train/loss", loss.item(), step)
        on_any_step(step, loss)

    def on_epoch(row, seconds):
        writer.add_scalar("val/loss", row["val_loss"], row["epoch"])
        writer.add_scalar("val/accuracy", row["val_accuracy"], row["epoch"])
        writer.add_scalar("train/epoch_loss", row["train_loss"], row["epoch"])
        tracker.log_metrics({**{k: v for k, v in row.items() if k != "epoch"}, "epoch_seconds": seconds,
                             "images_per_s": n_train / seconds}, step=row["epoch"])

    try:
        model, history, last, epoch_seconds = fit(
            params, meta, data, device, resume, on_step, on_epoch,
            save_checkpoint=lambda ckpt: save_checkpoint({**ckpt, "fingerprint": expect,
                                                          "mlflow_run_id": tracker.run_id}), group=group)
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if resume is None:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(model, make_sample_input(meta, device))
    writer.close()

    final = {k: last[k] for k in ("format", "model", "epoch")}
    final["state_dict"] = last["average"]["weights"] if "average" in last else last["state_dict"]
    final.update(classes=meta["classes"], normalization={"mean": meta["mean"], "std": meta["std"]},
                 input=meta["input"],
                 params=params, dataset=meta["dataset"], val_metrics=history[-1])
    total = sum(epoch_seconds)
    write_files({
        MODEL_PATH: torch_bytes(final),
        RUN_FILE: json_bytes(tracker.record()),
        METRICS_PATH: json_bytes({"epochs": len(history), **{k: v for k, v in history[-1].items() if k != "epoch"}}),
        HISTORY_PATH: history_csv(history),
        TIME_PATH: json_bytes({"device": str(device), "processes": group.world, "threads": threads,
                               "precision": precision, "epochs_run": len(epoch_seconds), "seconds": round(total, 2),
                               "images_per_s": round(n_train * len(epoch_seconds) / total, 1)}),
    })
    for path in (METRICS_PATH, HISTORY_PATH, TIME_PATH):
        tracker.log_artifact(path, "metrics")
    tracker.log_artifact(LOG_DIR, "tensorboard")
    tracker.finish()
    print(f"wrote {MODEL_PATH} (val accuracy {history[-1]['val_accuracy']:.4f}), {METRICS_PATH}, logs in {LOG_DIR}/"
          + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))


def print_nothing(*args, **kwargs) -> None:
    pass


def make_sample_input(meta: dict, device) -> torch.Tensor:
    return torch.zeros(1, *meta["input_shape"], device=device).contiguous(memory_format=torch.channels_last)


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
