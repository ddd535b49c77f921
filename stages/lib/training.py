"""The training loop, read top to bottom in `fit`, and the choices around it: the learning-rate schedule,
the weight average, the epoch kept (`kept_row`) and inference over a loader (`logits_of`).

`fit` is a generator: it yields an `Epoch` after every epoch (its metrics row, the resume checkpoint,
the model to validate and export). The train stage writes its outputs from those; the benchmark times
them. Nothing here calls back into either.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from stages.lib import faults
from stages.lib.device import use_bf16
from stages.lib.distributed import SINGLE, Group
from stages.lib.errors import PipelineError
from stages.lib.loader import BatchLoader
from stages.lib.modelfile import FORMAT
from stages.lib.nets import WHITEN_IMAGES, build_model, freeze_backbone, model_config, whiten_first_conv
from stages.lib.transforms import Preprocess

VAL_BATCH = 1000  # validation images per forward pass


def learning_rate(step: int, total_steps: int, lr: float, schedule: str, warmup: float) -> float:
    """The learning rate for SGD step `step` (0-based) of `total_steps`.

    constant: `lr` throughout (the tutorial). onecycle: a triangle, rising linearly from ~0 to `lr` over
    the first `warmup` fraction of the steps, then falling linearly to 0 at the last step.
    """
    if schedule == "constant":
        return lr
    peak = max(1, round(warmup * total_steps))
    if step < peak:
        return lr * (step + 1) / peak
    return lr * max(0.0, (total_steps - step - 1) / max(1, total_steps - peak))


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every
    SGD step; evaluating the average is usually better than the last weights of a noisy run.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates, so early (random) weights are
    forgotten quickly."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        self._floats = [list(t) for t in zip(*[p for p in pairs if p[0].is_floating_point()])]
        self._others = [p for p in pairs if not p[0].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if self._floats:
            torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - decay)
        for average, current in self._others:  # e.g. BatchNorm's step counter
            average.copy_(current)

    def state_dict(self) -> dict:
        return {"updates": self.updates,
                "weights": {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.model.load_state_dict(state["weights"])


@torch.inference_mode()
def logits_of(model: nn.Module, loader, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits, labels) of every image of the loader, in order; `bf16` runs the forward passes under
    bfloat16 autocast (evaluate.precision, see use_bf16)."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        # no autocast context at all without bf16: a disabled one would switch off an enclosing one (fit's)
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits.append(model(x).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; the loss is summed per batch of `batch_size` in float32, then over
    batches in float64, so the figure does not depend on how many images are kept at once."""
    total = sum(F.cross_entropy(chunk, y, reduction="sum").item()
                for chunk, y in zip(logits.split(batch_size), labels.split(batch_size)))
    return total / len(labels), (logits.argmax(1) == labels).float().mean().item()


def validation_metrics(model: nn.Module, loader: BatchLoader, group: Group) -> dict:
    """Loss and accuracy on the validation split; in a process group each rank has its share (the
    loader holds images[rank::world]) and the sums are all-reduced."""
    loss, accuracy = loss_and_accuracy(*logits_of(model, loader), loader.batch_size)
    n = len(loader.labels)
    if group.world == 1:
        return {"loss": loss, "accuracy": accuracy}
    loss_sum, correct, count = group.sum(loss * n, round(accuracy * n), n, device=loader.labels.device)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def validated(epoch: int, train) -> bool:
    """Whether fit validates after `epoch` (1-based): every train.val_every-th epoch and the last one
    (val_every 0: the last only). The rows of the others hold no validation metrics (None)."""
    return epoch == train.epochs or bool(train.val_every) and epoch % train.val_every == 0


def best_row(history: list[dict]) -> dict:
    """The validated epoch with the highest validation accuracy; a lower validation loss breaks a tie, then the
    earlier."""
    return max((row for row in history if row["val_accuracy"] is not None),
               key=lambda row: (row["val_accuracy"], -row["val_loss"]))


def kept_row(history: list[dict], keep: str) -> dict:
    """The epoch whose weights the model file holds: train.keep = best (best_row) or last."""
    return best_row(history) if keep == "best" else history[-1]


def cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


@dataclass
class Epoch:
    """What `fit` yields after each epoch."""
    row: dict                       # epoch, train_loss, val_loss, val_accuracy (None: not validated, train.val_every)
    seconds: float                  # training time of this epoch (validation not included)
    images: int                     # training images per epoch
    losses: list[tuple[int, float]]  # (SGD step, loss) every train.log_every steps, for TensorBoard
    checkpoint: dict                # the resume state after this epoch (stages/lib/modelfile.py); with train.keep
                                    # best, "best_state" holds the weights of the best epoch so far
    model: nn.Module                # what is validated: the weight average when train.ema is on
    stopped: bool                   # train.patience epochs without a better epoch: the last one fit yields


@dataclass
class Setup:
    """The objects one training run updates, built (or restored from a checkpoint) by `setup`."""
    config: dict
    model: nn.Module
    trained: nn.Module              # model, or its DistributedDataParallel wrapper in a process group
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    loader: BatchLoader
    val_loader: BatchLoader


def setup(params, meta: dict, data: dict, device: torch.device, resume: dict | None, group: Group) -> Setup:
    """The net (ImageNet weights when model.pretrained, unless resuming: the checkpoint has all weights;
    only its head trainable with model.freeze_backbone; its first conv fixed to patch whitening with
    model.whiten), SGD, the weight average and the loaders."""
    train = params.train
    torch.manual_seed(params.seed)
    config = model_config(params.model.name, meta["input_shape"], len(meta["classes"]), params.model.tta_flip,
                          params.model.tta_translate)
    model = build_model(config, pretrained=params.model.pretrained and not resume)
    if params.model.freeze_backbone:
        freeze_backbone(model, config["name"])
    shape = meta["input_shape"][1:]  # the stored splits are padded already
    normalize = Preprocess(shape, shape, meta["mean"], meta["std"])
    if params.model.whiten:  # on the CPU, where the images and the fresh net are
        whiten_first_conv(model, config["name"], None if resume else normalize(data["train"][0][:WHITEN_IMAGES]))
    model, normalize = model.to(device).to(memory_format=torch.channels_last), normalize.to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                                momentum=train.momentum, nesterov=train.nesterov, weight_decay=train.weight_decay)
    average = WeightAverage(model, train.ema) if train.ema else None
    loader = BatchLoader(*data["train"], train.batch_size, normalize, seed=params.seed, crop=train.augment_crop,
                         flip=train.augment_flip, group=group)
    val_x, val_y = data["val"]
    val_loader = BatchLoader(val_x[group.rank::group.world], val_y[group.rank::group.world], VAL_BATCH, normalize)
    if resume:
        model.load_state_dict(resume["state_dict"])
        optimizer.load_state_dict(resume["optimizer"])
        if average:
            average.load_state_dict(resume["average"])
        loader.load_state_dict(resume)
        torch.set_rng_state(resume["torch_rng"])
    trained = model
    if group.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Setup(config, model, trained, optimizer, average, loader, val_loader)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr


def fit(params, meta: dict, data: dict, device: torch.device, resume: dict | None = None,
        group: Group = SINGLE) -> Iterator[Epoch]:
    """Train the configured model on data = {"train": (images, labels), "val": (...)}, from scratch or from
    a `resume` checkpoint, yielding an Epoch after each epoch, and stopping early after train.patience
    epochs without a better one (best_row). In a process group (stages.lib.distributed) every rank runs
    fit with the same arguments and gets the same rows."""
    train = params.train
    run = setup(params, meta, data, device, resume, group)
    final_model = run.average.model if run.average else run.model
    history, start_epoch = (list(resume["history"]), resume["epoch"]) if resume else ([], 0)
    best_state = resume.get("best_state") if resume else None
    loss_fn, bf16 = nn.CrossEntropyLoss(label_smoothing=train.label_smoothing), use_bf16(train.precision, device)
    total_steps, step = train.epochs * len(run.loader), start_epoch * len(run.loader)
    set_lr(run.optimizer, learning_rate(step, total_steps, train.lr, train.schedule, train.warmup))
    for epoch in range(start_epoch + 1, train.epochs + 1):
        began, loss_sum, seen, losses = time.perf_counter(), None, 0, []
        run.trained.train()
        for x, y in tqdm(run.loader, unit="batch", desc=f"epoch {epoch}/{train.epochs}", leave=False,
                         disable=None if group.main else True, mininterval=1.0):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(run.trained(x).float(), y)  # the loss in float32 either way
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            loss_sum = loss.detach() * len(y) if loss_sum is None else loss_sum + loss.detach() * len(y)
            seen, step = seen + len(y), step + 1
            set_lr(run.optimizer, learning_rate(step, total_steps, train.lr, train.schedule, train.warmup))
            if run.average:
                run.average.update()
            if step % train.log_every == 0:
                losses.append((step, loss.item()))
            faults.at("step", step)
        loss_sum, seen = group.sum(loss_sum.item() if loss_sum is not None else 0.0, seen, device=device)
        train_loss = loss_sum / seen
        if train_loss != train_loss or train_loss == float("inf"):
            raise PipelineError(f"training diverged (mean loss {train_loss}); lower train.lr")
        seconds = time.perf_counter() - began
        row = {"epoch": epoch, "train_loss": round(train_loss, 6), "val_loss": None, "val_accuracy": None}
        if validated(epoch, train):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # the evaluate stage uses fp32
                val = validation_metrics(final_model, run.val_loader, group)
            row.update(val_loss=round(val["loss"], 6), val_accuracy=round(val["accuracy"], 6))
        history.append(row)
        stopped = False
        if train.keep == "best" or train.patience:  # both need every epoch validated (train.val_every 1, params.py)
            best = best_row(history)
            if train.keep == "best" and best is history[-1]:
                best_state = cpu_state(final_model)
            stopped = bool(train.patience) and epoch - best["epoch"] >= train.patience
        checkpoint = {"format": FORMAT, "model": run.config, "state_dict": cpu_state(run.model), "epoch": epoch,
                      "history": list(history), "optimizer": run.optimizer.state_dict(), **run.loader.state_dict(),
                      "torch_rng": torch.get_rng_state(), **({"average": run.average.state_dict()} if run.average else {}),
                      **({"best_state": best_state} if train.keep == "best" else {}), "stopped": stopped}
        yield Epoch(history[-1], seconds, len(run.loader.labels), losses, checkpoint, final_model, stopped)
        if stopped:
            return
