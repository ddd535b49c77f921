"""The one preprocessing from stored pixels to the net's input: zero-padding and normalization.

The data set's images (uint8 C×H×W at its native size, as stages/lib/images.py decodes any file) are
zero-padded evenly to the net's size (28 -> 32 adds 2 on each side), scaled to 0..1 and normalized with
the training split's per-channel mean and std. `Preprocess` is that as an nn.Module, and it is the only
implementation: the training loader, evaluate, predict and model.onnx (`RawImageNet`) all run it.
preprocess pads the stored splits ahead of time with the same `padding`, so the loader's Preprocess
finds nothing left to pad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def padding(size: list[int], pad_to: list[int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zeros that bring H×W `size` up to `pad_to` (never cropping)."""
    (h, w), (ph, pw) = size, pad_to
    dh, dw = max(ph - h, 0), max(pw - w, 0)
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


def pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """N×H×W or N×C×H×W uint8 -> N×C×H'×W' zero-padded up to size×size (what preprocess stores)."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return F.pad(images, padding(images.shape[-2:], [size, size])).contiguous()


def unpad(images: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Padded images -> the data set's own pixels at `size`: the inverse of pad_images."""
    left, _, top, _ = padding(size, images.shape[-2:])
    return images[..., top:top + size[0], left:left + size[1]].contiguous()


class Preprocess(nn.Module):
    """uint8 N×C×H×W at `size` -> float32 N×C×H'×W' at `pad_to`: (x/255 - mean)/std, channels_last."""

    def __init__(self, size: list[int], pad_to: list[int], mean: list[float], std: list[float]):
        super().__init__()
        self.padding = padding(size, pad_to)
        shape = (1, len(mean), 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(shape))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(shape))

    @classmethod
    def of(cls, spec: dict, normalization: dict, padded: bool = False) -> "Preprocess":
        """From a model file's (or meta.json's) `input` and normalization; `padded`: for images already
        padded by preprocess (the stored splits)."""
        size = spec["pad_to"] if padded else spec["size"]
        return cls(size, spec["pad_to"], normalization["mean"], normalization["std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if any(self.padding):
            x = F.pad(x, self.padding)
        x = x * self.scale - self.shift
        return x.contiguous(memory_format=torch.channels_last)  # the layout these nets run fastest in on a CPU


class RawImageNet(nn.Module):
    """The net on images as the data set stores them: uint8 N×C×H×W -> (logits, probabilities); what
    export writes to model.onnx."""

    def __init__(self, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.preprocess, self.net = preprocess, net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.preprocess(images))
        return logits, logits.softmax(1)
