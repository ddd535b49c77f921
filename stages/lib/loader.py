"""Batches of in-memory uint8 images, ready for the net: `for images, labels in loader:`.

Images stay uint8 (on the GPU when there is one) and are shuffled, augmented and normalized (`normalize`:
transforms.Preprocess, the one normalization) a whole batch at a time, in channels_last layout, which these nets run fastest in on a CPU; no DataLoader workers and no
per-sample PIL. In a process group every rank draws the same global batches and keeps its slice of each
(batch[rank::world]), so N processes see exactly the batches and augmentations one process would.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stages.lib.distributed import SINGLE, Group


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


def steps_per_epoch(images: int, batch_size: int, world: int = 1) -> int:
    """Batches in one pass: the last, partial one too unless it is too small to give every rank an image."""
    full, rest = divmod(images, batch_size)
    return full + (rest >= world if rest else 0)


class BatchLoader:
    """Shuffled (seeded), augmented, normalized batches of (images, labels) of this rank, on their device.

    With `seed`, each pass shuffles with its own generator and augments (crop/flip) with a second one
    (seed + 1), so the two streams stay apart; `state_dict()` holds both, for resuming. Without a seed the
    batches come in order and unaugmented (validation). A last batch too small to give every rank an
    image is dropped.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Callable,
                 seed: int | None = None, crop: int = 0, flip: bool = False, group: Group = SINGLE):
        self.images, self.labels, self.batch_size, self.normalize, self.group = images, labels, batch_size, normalize, group
        self.shuffle = torch.Generator().manual_seed(seed) if seed is not None else None
        self.augment_rng = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        self.augment = make_augmenter(crop, flip, self.augment_rng) if seed is not None else None

    def __len__(self) -> int:
        return steps_per_epoch(len(self.labels), self.batch_size, self.group.world)

    def __iter__(self):
        n, device = len(self.labels), self.labels.device
        order = torch.randperm(n, generator=self.shuffle).to(device) if self.shuffle else None
        rank, world = self.group.rank, self.group.world
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            images, labels = self.images[idx], self.labels[idx]
            if len(labels) < world:
                break
            if self.augment:
                images = self.augment(images)
            yield self.normalize(images[rank::world]), labels[rank::world]

    def state_dict(self) -> dict:
        return {"shuffle_rng": self.shuffle.get_state(), "augment_rng": self.augment_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.shuffle.set_state(state["shuffle_rng"])
        self.augment_rng.set_state(state["augment_rng"])
