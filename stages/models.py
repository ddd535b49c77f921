"""Model definitions, built from a small config dict that travels inside every checkpoint."""
from __future__ import annotations

from torch import nn

from stages.errors import PipelineError


class Tudui(nn.Module):
    """The tutorial's CIFAR10-quick net: three 5×5 conv + 2×2 max-pool blocks, then two Linear layers.

    For the tutorial's 3×32×32 input: 32×32×32 -> 32×16×16 -> 32×16×16 -> 32×8×8 -> 64×8×8 -> 64×4×4
    -> 1024 -> 64 -> 10. Channels, size and class count follow the data.
    """

    def __init__(self, in_channels: int = 3, input_size: tuple[int, int] = (32, 32), num_classes: int = 10):
        super().__init__()
        h, w = input_size
        if h % 8 or w % 8:
            raise PipelineError(f"cifar10_quick needs height and width divisible by 8, got {h}×{w} "
                                "(set preprocess.pad_to, e.g. 32)")
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, 1, 2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5, 1, 2),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, 1, 2),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (h // 8) * (w // 8), 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.model(x)


MODELS = {"cifar10_quick": Tudui}


def model_config(name: str, input_shape: list[int], num_classes: int) -> dict:
    """The dict a checkpoint stores so that `build_model` can rebuild the same net."""
    return {"name": name, "in_channels": input_shape[0], "input_size": list(input_shape[1:]),
            "num_classes": num_classes}


def build_model(config: dict) -> nn.Module:
    if config["name"] not in MODELS:
        raise PipelineError(f"unknown model {config['name']!r}; allowed: {', '.join(MODELS)}")
    return MODELS[config["name"]](config["in_channels"], tuple(config["input_size"]), config["num_classes"])
