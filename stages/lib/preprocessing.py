"""The one preprocessing, from an image file to the net's input, in two steps:

1. `imagefile.decode_image`: the file (any format and mode Pillow reads) -> uint8 C×H×W at the data set's
   size, converted and resized the way preprocess stored its images.
2. `Preprocess`: uint8 N×C×H×W at that size -> the net's float input: zero-padded to the net's size as
   preprocess padded the training data, scaled to 0..1 and normalized with the training split's mean and
   std, with the very float32 operations of training's normalizer (loader.make_normalizer).

Step 2 is an nn.Module so that the same code runs in predict (ModelFile.prepare) and inside model.onnx:
`RawImageNet` chains it, the net (with its flip TTA when model.tta_flip is on) and a softmax, and is
what export writes to ONNX. Only step 1 (Pillow) stays outside the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess(nn.Module):
    """uint8 N×C×H×W at `size` -> float32 N×C×H'×W' at `pad_to`: (x/255 - mean)/std, channels_last."""

    def __init__(self, size: list[int], pad_to: list[int], mean: list[float], std: list[float]):
        super().__init__()
        (h, w), (ph, pw) = size, pad_to
        dh, dw = max(ph - h, 0), max(pw - w, 0)
        self.padding = (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)  # as data.pad_images pads: 28 -> 32 is 2 + 2
        shape = (1, len(mean), 1, 1)
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(shape))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(shape))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if any(self.padding):
            x = F.pad(x, self.padding)
        x = x * self.scale - self.shift
        return x.contiguous(memory_format=torch.channels_last)  # the layout these nets run fastest in on a CPU


class RawImageNet(nn.Module):
    """The net on images as the data set stores them: uint8 N×C×H×W -> (logits, probabilities)."""

    def __init__(self, preprocess: Preprocess, net: nn.Module):
        super().__init__()
        self.preprocess, self.net = preprocess, net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(self.preprocess(images))
        return logits, logits.softmax(1)


def unpad(images: torch.Tensor, size: list[int]) -> torch.Tensor:
    """Prepared images (padded by preprocess) -> the data set's own pixels at `size`: the inverse of
    data.pad_images, which pads evenly (28 -> 32 adds 2 on each side)."""
    (h, w), (ph, pw) = size, images.shape[-2:]
    top, left = (ph - h) // 2, (pw - w) // 2
    return images[..., top:top + h, left:left + w].contiguous()
