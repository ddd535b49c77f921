"""The training and evaluation loops, as plain functions over in-memory uint8 tensors.

Images stay uint8 (on the GPU when there is one) and are normalized one batch at a time, in
channels_last layout, which this net runs fastest in on CPU; no DataLoader and no per-sample PIL.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stages.errors import PipelineError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


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


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    images: torch.Tensor, labels: torch.Tensor, normalize: Callable, batch_size: int,
                    generator: torch.Generator, on_step: Callable[[int, torch.Tensor], None] | None = None,
                    progress=None, augment: Callable | None = None) -> float:
    """One pass over shuffled batches (each passed through `augment` first, if given); returns the mean
    training loss per image."""
    model.train()
    order = torch.randperm(len(labels), generator=generator).to(labels.device)
    total = torch.zeros((), device=labels.device)
    for step, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start:start + batch_size]
        batch = images[idx]
        x, y = normalize(augment(batch) if augment else batch), labels[idx]
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        if on_step:
            on_step(step, loss)
        if progress is not None:
            progress.update(len(idx))
    mean_loss = total.item() / len(order)
    if mean_loss != mean_loss or mean_loss == float("inf"):
        raise PipelineError(f"training diverged (mean loss {mean_loss}); lower train.lr")
    return mean_loss


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Callable,
             batch_size: int) -> dict:
    """Mean cross-entropy, accuracy and every prediction over a whole split."""
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
