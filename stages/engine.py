"""The training and evaluation loops, as plain functions over in-memory uint8 tensors.

Images stay uint8 (on the GPU when there is one) and are normalized one batch at a time, in
channels_last layout, which this net runs fastest in on CPU; no DataLoader and no per-sample PIL.
"""
from __future__ import annotations

import copy
import os
from typing import Callable

import torch
from torch import nn

from stages.distributed import SINGLE, Group
from stages.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def set_threads(requested: int, local_processes: int = 1) -> int:
    """Fix torch's CPU thread count for the whole run and return it: `requested` (the `threads` param)
    when > 0, else the cores this process may run on (its CPU affinity: `taskset` narrows it) divided
    among the processes of this machine. Never what other jobs are doing: a different thread count
    changes float rounding, and results must not depend on what else runs."""
    if requested:
        threads = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        threads = max(1, cores // local_processes)
    torch.set_num_threads(threads)
    return threads


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training runs under bfloat16 autocast. auto: on GPUs and CPUs with native bf16 arithmetic
    (AVX512-BF16 or AMX; there it is ~1.7× faster than float32 for these nets), float32 elsewhere."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def make_normalizer(mean: list[float], std: list[float], device: torch.device) -> Callable:
    """uint8 N×C×H×W -> float32 (x/255 - mean)/std, channels_last, on `device`."""
    shape = (1, len(mean), 1, 1)
    scale = (1.0 / (255.0 * torch.tensor(std))).view(shape).to(device)
    shift = (torch.tensor(mean) / torch.tensor(std)).view(shape).to(device)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, non_blocking=True).float().mul_(scale).sub_(shift)
        return x.contiguous(memory_format=torch.channels_last)

    return normalize


def make_augmenter(crop: int, flip: bool, generator: torch.Generator) -> Callable | None:
    """Training augmentation of a whole N×C×H×W batch (uint8 or float, on any device); None when off.

    With `crop`, every image is zero-padded by `crop` pixels on each side and a random H×W window is cut
    back out (torchvision's RandomCrop(size, padding=crop)); with `flip`, every image is mirrored
    left-right with probability 1/2. All random numbers come from `generator` (a CPU generator), so a
    resumed run that restores its state draws the same ones.
    """
    if not crop and not flip:
        return None

    def augment(images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        device = images.device
        if flip:
            mirrored = (torch.rand(n, generator=generator) < 0.5).to(device)
            images = torch.where(mirrored.view(n, 1, 1, 1), images.flip(3), images)
        if crop:
            padded = nn.functional.pad(images, (crop, crop, crop, crop))
            top, left = torch.randint(0, 2 * crop + 1, (2, n, 1), generator=generator).to(device)
            rows = (top + torch.arange(h, device=device)).view(n, 1, h, 1)
            cols = (left + torch.arange(w, device=device)).view(n, 1, 1, w)
            images = padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                            torch.arange(c, device=device).view(1, c, 1, 1), rows, cols]
        return images

    return augment


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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    images: torch.Tensor, labels: torch.Tensor, normalize: Callable, batch_size: int,
                    generator: torch.Generator, on_step: Callable[[int, torch.Tensor], None] | None = None,
                    progress=None, augment: Callable | None = None, lr_at: Callable[[int], float] | None = None,
                    average: WeightAverage | None = None, bf16: bool = False, group: Group = SINGLE) -> float:
    """One pass over shuffled batches; returns the mean training loss per image.

    Each batch goes through `augment` first, if given; `lr_at(step)` sets the learning rate of every
    step of this epoch; `average` is updated after every step; `bf16` runs the forward pass under
    bfloat16 autocast (see use_bf16); the loss is computed in float32. In a process group every rank
    draws the same global batches and trains on its slice of each, batch[rank::world]."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    total, seen = torch.zeros((), device=labels.device), 0
    for step, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        if len(idx) < group.world:  # a last batch too small to give every rank an image
            break
        batch = augment(images[idx]) if augment else images[idx]
        x, y = normalize(batch[group.rank::group.world]), labels[idx][group.rank::group.world]
        if lr_at:
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_at(step)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average:
            average.update()
        total += loss.detach() * len(y)
        seen += len(y)
        if on_step:
            on_step(step, loss)
        if progress is not None:
            progress.update(len(idx))
    loss_sum, count = group.sum(total.item(), seen, device=labels.device)
    mean_loss = loss_sum / count
    if mean_loss != mean_loss or mean_loss == float("inf"):
        raise PipelineError(f"training diverged (mean loss {mean_loss}); lower train.lr")
    return mean_loss


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
             batch_size: int) -> dict:
    """Mean cross-entropy, accuracy and every prediction over a whole split (in float32 always)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, predictions = 0.0, []
    for start in range(0, len(labels), batch_size):
        logits = model(normalize(images[start:start + batch_size]))
        y = labels[start:start + batch_size]
        total_loss += loss_fn(logits.float(), y).item()
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions)
    return {"loss": total_loss / len(labels),
            "accuracy": (predicted == labels).float().mean().item(),
            "predictions": predicted.cpu()}
