"""The training and evaluation loops as plain functions, and the choices around them: device, threads,
precision, learning-rate schedule and the weight average."""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Callable

import torch
from torch import nn

from stages.lib.errors import PipelineError


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
    """Whether training (train.precision) or evaluate's inference (evaluate.precision) runs under
    bfloat16 autocast. auto: on GPUs and CPUs with native bf16 arithmetic (AVX512-BF16 or AMX; there it
    is ~1.7× faster than float32 for these nets), float32 elsewhere; bf16 forces it (emulated, slowly,
    on a CPU without native bf16)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


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


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    bf16: bool = False, after_step: Callable[[torch.Tensor], None] | None = None) -> tuple[float, int]:
    """One pass over the loader's batches; returns (sum of the per-image training losses, images seen).

    `bf16` runs the forward pass under bfloat16 autocast (see use_bf16); the loss is computed in float32.
    `after_step(loss)` runs after every optimizer step: the schedule, the weight average, logging."""
    model.train()
    total, seen = None, 0
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = loss.detach() * len(y) if total is None else total + loss.detach() * len(y)
        seen += len(y)
        if after_step:
            after_step(loss)
    return (total.item() if total is not None else 0.0), seen


@torch.inference_mode()
def evaluate(model: nn.Module, loader, bf16: bool = False) -> dict:
    """Mean cross-entropy, accuracy and every prediction over the loader's batches, in order; `bf16` runs
    the forward passes under bfloat16 autocast (evaluate.precision, see use_bf16), the loss in float32."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, predictions, labels = 0.0, [], []
    for x, y in loader:
        # no autocast context at all without bf16: a disabled one would switch off an enclosing one (fit's)
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x)
        total_loss += loss_fn(logits.float(), y).item()
        predictions.append(logits.argmax(1))
        labels.append(y)
    predicted, labels = torch.cat(predictions), torch.cat(labels)
    return {"loss": total_loss / len(labels), "accuracy": (predicted == labels).float().mean().item(),
            "predictions": predicted.cpu()}
