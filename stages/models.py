"""Model definitions, built from a small config dict that travels inside every checkpoint.

`cifar10_quick` is the tutorial's own net; `vgg16` and `resnet18` are torchvision's, with the last
layer replaced for the data set's class count and the first conv fitted to its channel count. Their
ImageNet weights (model.pretrained) are read only from the torch hub cache: nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from stages.errors import PipelineError

SMALL_INPUT = 64  # resnet18 inputs smaller than this (in height or width) get the CIFAR-style stem
IMAGENET_WEIGHTS = {"vgg16": torchvision.models.VGG16_Weights.IMAGENET1K_V1,
                    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1}


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


class FastCNN(nn.Module):
    """The fast recipe's net: the tutorial's three conv + max-pool stages with 3×3 kernels, BatchNorm and
    ReLU (the tutorial net has no nonlinearity but its max-pools), then a global max-pool and one Linear.

    Stage i: `convs[i]` 3×3 convs with `widths[i]` channels, each followed by BN and ReLU, with the
    stage's 2×2 max-pool right after its last conv (before BN and ReLU, as airbench does: the same net up
    to BN's sign, and a quarter of the memory traffic, which is what limits these layers on a CPU).
    Any input from 8×8 up.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], convs: list[int]):
        super().__init__()
        layers, channels = [], in_channels
        for width, count in zip(widths, convs):
            for index in range(count):
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
                if index == count - 1:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(torch.amax(self.features(x), dim=(2, 3)))


class FlipAveraged(nn.Module):
    """Test-time augmentation baked into the model (model.tta_flip): in eval mode the logits are the mean
    of the image's and its left-right mirror's, so evaluate, predict and the ONNX export all agree.
    Training runs the plain net."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        if self.training:
            return self.net(x)
        return (self.net(x) + self.net(x.flip(3))) / 2


def tudui(config: dict, imagenet: dict | None) -> Tudui:
    return Tudui(config["in_channels"], tuple(config["input_size"]), config["num_classes"])


def vgg16(config: dict, imagenet: dict | None) -> nn.Module:
    """torchvision's VGG16 with `classifier[6] = nn.Linear(4096, num_classes)`, as the tutorial does.

    Inputs from 32×32 up work unchanged: the five 2×2 max-pools leave a 1×1 map at 32 px, which
    AdaptiveAvgPool2d((7, 7)) repeats to the 7×7 that the 25088-wide classifier (and its ImageNet
    weights) expects. For 1-channel data the first conv takes one input channel (see fit_channels).
    """
    h, w = config["input_size"]
    if min(h, w) < 32:
        raise PipelineError(f"vgg16 needs inputs of at least 32×32 (five 2×2 max-pools), got {h}×{w} "
                            "(set preprocess.pad_to or preprocess.image_size to 32 or more)")
    net = load_imagenet(torchvision.models.vgg16(), imagenet)
    net.features[0] = fit_channels(net.features[0], config["in_channels"], imagenet is not None)
    net.classifier[6] = nn.Linear(4096, config["num_classes"])
    return net


def resnet18(config: dict, imagenet: dict | None) -> nn.Module:
    """torchvision's ResNet18 with `fc` replaced for the class count.

    With `small_input_stem` (inputs under 64 px, such as 32×32 CIFAR-10 and padded MNIST) the stem is
    CIFAR-style: conv1 is a 3×3 stride-1 conv and the max-pool is dropped, so a 32×32 input reaches
    layer4 as 4×4 instead of 1×1. That conv1 is freshly initialised even with ImageNet weights (the
    7×7 stride-2 ImageNet kernels do not fit it); every other layer but fc gets them. With the
    ImageNet stem, 1-channel data gets a 1-channel conv1 (see fit_channels).
    """
    net = load_imagenet(torchvision.models.resnet18(), imagenet)
    if config["small_input_stem"]:
        net.conv1 = nn.Conv2d(config["in_channels"], 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
        net.maxpool = nn.Identity()
    else:
        net.conv1 = fit_channels(net.conv1, config["in_channels"], imagenet is not None)
    net.fc = nn.Linear(net.fc.in_features, config["num_classes"])
    return net


def fast_cnn(config: dict, imagenet: dict | None) -> FastCNN:
    h, w = config["input_size"]
    if min(h, w) < 8:
        raise PipelineError(f"fast_cnn needs inputs of at least 8×8 (three 2×2 max-pools), got {h}×{w}")
    return FastCNN(config["in_channels"], config["num_classes"], config["widths"], config["convs"])


MODELS = {"cifar10_quick": tudui, "fast_cnn": fast_cnn, "vgg16": vgg16, "resnet18": resnet18}
HEADS = {"cifar10_quick": "model.8", "fast_cnn": "head", "vgg16": "classifier.6", "resnet18": "fc"}  # the last layer
FAST_CNN = {"widths": [32, 64, 128], "convs": [1, 1, 2]}  # channels and conv layers of its three stages


def fit_channels(conv: nn.Conv2d, in_channels: int, pretrained: bool) -> nn.Conv2d:
    """`conv` (built for RGB) taking `in_channels` inputs. For 1 channel, pretrained RGB kernels are summed
    over the input-channel axis (a gray image then gets the response its RGB copy would); random
    kernels keep their first channel, which is exactly torchvision's fan-out initialisation."""
    if in_channels == conv.in_channels:
        return conv
    if in_channels != 1:
        raise PipelineError(f"{in_channels}-channel images are not supported; allowed: 1 or {conv.in_channels}")
    fitted = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       bias=conv.bias is not None)
    with torch.no_grad():
        fitted.weight.copy_(conv.weight.sum(1, keepdim=True) if pretrained else conv.weight[:, :1])
        if conv.bias is not None:
            fitted.bias.copy_(conv.bias)
    return fitted


def imagenet_weights_path(name: str) -> Path:
    """Where torchvision caches `name`'s ImageNet weights: <torch.hub.get_dir()>/checkpoints/<file in the URL>.

    Raises PipelineError naming the file and the folder when it is not there; never downloads."""
    if name not in IMAGENET_WEIGHTS:
        raise PipelineError(f"model.pretrained: true needs a model with ImageNet weights "
                            f"({', '.join(IMAGENET_WEIGHTS)}); {name} has none")
    url = IMAGENET_WEIGHTS[name].url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise PipelineError(f"model.pretrained: {path.name} is not in {path.parent} and is never downloaded here; "
                            f"fetch {url} elsewhere and put it in that folder (TORCH_HOME moves it), "
                            "or set model.pretrained: false")
    return path


def read_imagenet_weights(name: str) -> dict:
    path = imagenet_weights_path(name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download makes torch.load raise almost anything
        raise PipelineError(f"{path} is not a readable PyTorch file ({exc.__class__.__name__}); "
                            "delete it and fetch it again") from None


def load_imagenet(net: nn.Module, imagenet: dict | None) -> nn.Module:
    if imagenet is not None:
        try:
            net.load_state_dict(imagenet)
        except RuntimeError as exc:
            raise PipelineError(f"the ImageNet weights file does not fit {net.__class__.__name__} "
                                f"({' '.join(str(exc).split())[:300]})") from None
    return net


def model_config(name: str, input_shape: list[int], num_classes: int, tta_flip: bool = False) -> dict:
    """The dict a checkpoint stores so that `build_model` can rebuild the same net, without downloads."""
    config = {"name": name, "in_channels": input_shape[0], "input_size": list(input_shape[1:]),
              "num_classes": num_classes}
    if name == "resnet18":
        config["small_input_stem"] = min(input_shape[1:]) < SMALL_INPUT
    if name == "fast_cnn":
        config.update({k: list(v) for k, v in FAST_CNN.items()})
    if tta_flip:
        config["tta_flip"] = True
    return config


def build_model(config: dict, pretrained: bool = False) -> nn.Module:
    """The net `config` describes; with `pretrained`, every layer that is not replaced or refitted starts
    from the ImageNet weights in the torch hub cache (PipelineError when they are not there)."""
    if config["name"] not in MODELS:
        raise PipelineError(f"unknown model {config['name']!r}; allowed: {', '.join(MODELS)}")
    imagenet = read_imagenet_weights(config["name"]) if pretrained else None
    net = MODELS[config["name"]](config, imagenet)
    return FlipAveraged(net) if config.get("tta_flip") else net


def freeze_backbone(model: nn.Module, name: str) -> None:
    """Leave requires_grad only in the replaced last layer (BatchNorm running statistics still update in
    train mode, as in the PyTorch transfer-learning tutorial)."""
    model.requires_grad_(False)
    net = model.net if isinstance(model, FlipAveraged) else model
    net.get_submodule(HEADS[name]).requires_grad_(True)
