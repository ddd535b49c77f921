"""Stage 3 — train: the tutorial's training loop on the prepared tensors (CUDA when available).

Writes models/model.pt (the self-describing model file, stages/lib/modelfile.py), models/checkpoint.pt
(the resume state after the last epoch), TensorBoard logs in logs/, and metrics/train.json (validation
and training loss), metrics/train_history.csv (per-epoch curves), metrics/train_time.json (speed, kept
apart so that the other files are identical across reruns) and metrics/train_env.json (device,
precision, threads: not metrics).

While it runs, the checkpoint after every epoch and the TensorBoard logs go to .resume/<fingerprint>/,
outside DVC's outputs: a run that fails or is interrupted leaves models/ and logs/ as they were, and the
rerun with the same settings and data resumes from its last complete epoch. The metrics files are
rewritten after every epoch so that `dvc exp show` and `dvc plots` follow a running experiment; a
failure or Ctrl-C puts the old ones back (after a SIGKILL they hold the killed run's epochs until the
rerun). Before writing anything it checks that params.yaml and its deps did not change while it ran.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch

from stages.lib import distributed
from stages.lib.distributed import Group
from stages.lib.errors import run
from stages.lib.files import clear_temps, csv_bytes, json_bytes, replaced_dir, restored_on_failure, write_files
from stages.lib.loader import steps_per_epoch
from stages.lib.modelfile import ModelFile, load_checkpoint, save_checkpoint
from stages.lib.nets import MODELS, imagenet_weights_path
from stages.lib.params import Params, load_params
from stages.lib.paths import (CHECKPOINT, LOG_DIR, MODEL, RESUME_DIR, RUN_FILE, TRAIN_ENV, TRAIN_HISTORY, TRAIN_METRICS,
                              TRAIN_TIME)
from stages.lib.prepared import load_meta, load_split, training_images
from stages.lib.provenance import Inputs
from stages.lib.tracking.runs import Tracker
from stages.lib.device import resolve_device, set_threads, use_bf16
from stages.lib.training import Epoch, cpu_state, fit, kept_row

LIVE = (TRAIN_METRICS, TRAIN_HISTORY, TRAIN_TIME, TRAIN_ENV)  # rewritten after every epoch


def fingerprint(params: Params, meta: dict) -> str:
    """What a resumed run must share with the checkpoint: everything that shapes the weights except
    where/how it is logged, how many processes share the work and, with a constant lr, the epoch count
    (more epochs continue the same run; a onecycle schedule is fitted to its epoch count, so there it counts)."""
    ignored = {"device", "log_every", "nproc", "val_every"} | ({"epochs"} if params.train.schedule == "constant" else set())
    keyed = {"seed": params.seed, "model": params.model.model_dump(), "train": params.train.model_dump(exclude=ignored),
             "data": meta["sha256"]}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def metrics_files(history: list[dict], epoch_seconds: list[float], n_train: int, env: dict, keep: str,
                  stopped: bool) -> dict:
    """{path: bytes} of the metrics after the epochs in `history`: train.json holds the epochs trained,
    whether train.patience stopped them, and the kept epoch (train.keep) with its metrics."""
    total, kept = sum(epoch_seconds), kept_row(history, keep)
    summary = {"epochs": len(history), "stopped_early": stopped, "kept_epoch": kept["epoch"],
               **{k: v for k, v in kept.items() if k != "epoch"}}
    return {TRAIN_METRICS: json_bytes(summary),
            TRAIN_HISTORY: csv_bytes(history),
            TRAIN_TIME: json_bytes({"seconds": round(total, 2),
                                    "images_per_s": round(n_train * len(epoch_seconds) / total, 1)}),
            TRAIN_ENV: json_bytes(env)}


def resume_state(fingerprint: str, epochs: int, say) -> tuple[Path, dict | None]:
    """This run's resume folder (.resume/<fingerprint>) and the checkpoint to continue from: the folder's
    (a failed or killed run of these settings), else models/checkpoint.pt when it is of these settings
    (more epochs of a finished run), else None: the folder is emptied for a run from scratch."""
    state = RESUME_DIR / fingerprint[:16]
    clear_temps(state / CHECKPOINT.name)
    resume = load_checkpoint(state / CHECKPOINT.name, fingerprint, epochs, say)
    if resume is None:
        shutil.rmtree(state, ignore_errors=True)
        resume = load_checkpoint(CHECKPOINT, fingerprint, epochs, say)
        if resume is not None and LOG_DIR.is_dir():
            shutil.copytree(LOG_DIR, state / LOG_DIR.name)  # the finished run's logs, appended to from here
    return state, resume  # the folder is made by the first write into it


def main(args) -> None:
    inputs = Inputs.read("train", rewritten=LIVE)
    params = load_params(choices={"model.name": MODELS})
    meta = load_meta()
    if params.train.nproc > 1 and not distributed.under_torchrun():
        sys.exit(distributed.launch(params.train.nproc, ["--debug"] if args.debug else []))
    group, device_name = distributed.init(params.train.device)
    try:
        train_stage(params, meta, group, resolve_device(device_name), inputs)
    finally:
        distributed.finish(group)


def train_stage(params: Params, meta: dict, group: Group, device: torch.device, inputs: Inputs) -> None:
    threads = set_threads(params.threads, group.local_world)
    data = {name: load_split(name, device=device) for name in ("train", "val")}
    data["train"] = training_images(data, params.train.train_on_val)
    expect = fingerprint(params, meta)
    if group.main:
        state, resume = resume_state(expect, params.train.epochs, print)
    else:  # the other ranks read the state rank 0 left (they resume together)
        state = RESUME_DIR / expect[:16]
        resume = load_checkpoint(state / CHECKPOINT.name, expect, params.train.epochs, lambda *a: None) \
            or load_checkpoint(CHECKPOINT, expect, params.train.epochs, lambda *a: None)
    if resume is None and params.model.pretrained:
        imagenet_weights_path(params.model.name)  # missing weights fail here, before anything is written
    epochs = fit(params, meta, data, device, resume, group)
    if not group.main:  # the other ranks train along and write nothing
        for _ in epochs:
            pass
        return
    clear_temps(MODEL, CHECKPOINT, RUN_FILE, *LIVE)
    env = {"device": str(device), "precision": "bf16" if use_bf16(params.train.precision, device) else "fp32",
           "threads": threads, "processes": group.world}
    tracker = Tracker.start(params.tracking, params, env, meta, resume.get("mlflow_run_id") if resume else None)
    ranks = f", {group.world} processes" if group.world > 1 else ""
    print(f"training {params.model.name} on {device} ({threads} threads{ranks}, {env['precision']}), "
          f"{len(data['train'][1])} train / {len(data['val'][1])} val images", flush=True)
    try:
        with restored_on_failure(*LIVE):
            last, seconds = record_epochs(epochs, params, meta, data, device, resume, state, expect, env, tracker)
            inputs.verify()
    except BaseException as exc:
        tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    kept = kept_row(last.checkpoint["history"], params.train.keep)
    weights = last.checkpoint["best_state"] if params.train.keep == "best" else cpu_state(last.model)
    final = ModelFile(config=last.checkpoint["model"], epoch=kept["epoch"], state_dict=weights,
                      classes=meta["classes"], normalization={"mean": meta["mean"], "std": meta["std"]},
                      input=meta["input"], params=params.model_dump(), dataset=meta["dataset"], val_metrics=kept)
    write_files({MODEL: final.to_bytes(), RUN_FILE: json_bytes(tracker.record()),
                 CHECKPOINT: (state / CHECKPOINT.name).read_bytes(),
                 **metrics_files(last.checkpoint["history"], seconds, last.images, env, params.train.keep, last.stopped)})
    tracker.log_metrics({"kept_epoch": kept["epoch"]}, step=last.row["epoch"])
    with replaced_dir(LOG_DIR) as staging:
        shutil.copytree(state / LOG_DIR.name, staging, dirs_exist_ok=True)
    shutil.rmtree(state, ignore_errors=True)
    for path in LIVE:
        tracker.log_artifact(path, "metrics")
    tracker.log_artifact(LOG_DIR, "tensorboard")
    tracker.finish()
    print(f"wrote {MODEL} (epoch {kept['epoch']}, the {params.train.keep}: val accuracy {kept['val_accuracy']:.4f}), "
          f"{TRAIN_METRICS}, logs in {LOG_DIR}/"
          + (f"; MLflow run {tracker.run_id}" if tracker.run_id else ""))


def record_epochs(epochs, params: Params, meta: dict, data: dict, device: torch.device, resume: dict | None,
                  state: Path, expect: str, env: dict, tracker: Tracker) -> tuple[Epoch, list[float]]:
    """Run the training (`epochs`, fit's generator) and after each epoch print it and write it out:
    TensorBoard and the checkpoint into the resume folder `state`, MLflow, the live metrics. Returns the
    last Epoch and the seconds of each epoch trained in this call."""
    from torch.utils.tensorboard import SummaryWriter

    steps = steps_per_epoch(len(data["train"][1]), params.train.batch_size, env["processes"])
    writer = SummaryWriter(str(state / LOG_DIR.name), purge_step=resume["epoch"] * steps + 1 if resume else None)
    if resume is None:
        writer.add_images("train/batch", data["train"][0][:64].float().div(255), 0)
    seconds, epoch = [], None
    for epoch in epochs:
        row = epoch.row
        val = (f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}"
               if row["val_accuracy"] is not None else "  (not validated: train.val_every)")
        print(f"epoch {row['epoch']}/{params.train.epochs}  train_loss {row['train_loss']:.4f}{val}  "
              f"{epoch.seconds:.1f}s  {epoch.images / epoch.seconds:,.0f} img/s", flush=True)
        for step, loss in epoch.losses:
            writer.add_scalar("train/loss", loss, step)
        for tag, key in (("val/loss", "val_loss"), ("val/accuracy", "val_accuracy"), ("train/epoch_loss", "train_loss")):
            if row[key] is not None:
                writer.add_scalar(tag, row[key], row["epoch"])
        tracker.log_epoch(row, epoch.seconds, epoch.images)
        save_checkpoint({**epoch.checkpoint, "fingerprint": expect, "mlflow_run_id": tracker.run_id},
                        state / CHECKPOINT.name)
        seconds.append(epoch.seconds)
        write_files(metrics_files(epoch.checkpoint["history"], seconds, epoch.images, env, params.train.keep,
                                  epoch.stopped))
        if epoch.stopped:
            print(f"stopping early: no better validation accuracy in {params.train.patience} epochs", flush=True)
    if resume is None:
        with warnings.catch_warnings():  # add_graph traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(epoch.model, torch.zeros(1, *meta["input_shape"], device=device))
    writer.close()
    return epoch, seconds


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
