"""The nets, one registry entry each: its builder (which also replaces the head for the data set's class
count), its input policy, the name of that head, and its ImageNet weights file. Adding a model is one
entry in MODELS plus its test; params.yaml's model.name accepts exactly these names.

A model is rebuilt from a small config dict that travels inside every model file. ImageNet weights
(model.pretrained) are read only from the torch hub cache: nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stages.lib.errors import PipelineError, one_line

WEIGHTS_URL = "https://download.pytorch.org/models/"  # where the ImageNet weights files can be fetched elsewhere


class Tudui(nn.Module):
    """The tutorial's CIFAR10-quick net: three 5×5 conv + 2×2 max-pool blocks, then two Linear layers.

    For the tutorial's 3×32×32 input: 32×32×32 -> 32×16×16 -> 32×16×16 -> 32×8×8 -> 64×8×8 -> 64×4×4
    -> 1024 -> 64 -> 10. Channels, size and class count follow the data.
    """

    def __init__(self, in_channels: int = 3, input_size: tuple[int, int] = (32, 32), num_classes: int = 10):
        super().__init__()
        h, w = input_size
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
    """The fast recipes' nets: the tutorial's three conv + max-pool stages with 3×3 kernels, BatchNorm and
    ReLU (the tutorial net has no nonlinearity but its max-pools), then a global max-pool and one Linear.

    Stage i: `convs[i]` 3×3 convs with `widths[i]` channels, each followed by BN and ReLU, with the
    stage's 2×2 max-pool right after one of its convs, before BN and ReLU (as airbench does: the same net
    up to BN's sign, and a quarter of the memory traffic, which is what limits these layers on a CPU).
    `pool`: after the stage's last conv ("last", fast_cnn) or its first ("first", airbench's order: the
    stage's other convs then run at a quarter of the pixels). `identity_init`: every conv with as many
    outputs as inputs starts as the identity (torch.nn.init.dirac_, as airbench does), so a fresh net
    passes each stage's first features through and SGD starts from a shallower net.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], convs: list[int], pool: str = "last",
                 identity_init: bool = False):
        super().__init__()
        layers, channels = [], in_channels
        for width, count in zip(widths, convs):
            for index in range(count):
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
                if identity_init and channels == width:
                    nn.init.dirac_(layers[-1].weight)
                if index == (0 if pool == "first" else count - 1):
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(torch.amax(self.features(x), dim=(2, 3)))


class ViewAveraged(nn.Module):
    """Test-time augmentation baked into the model, so that evaluate, predict and the ONNX export all agree;
    training runs the plain net. In eval mode the logits are averaged over views of each image: with `flip`
    the image and its left-right mirror (model.tta_flip); with `translate` (model.tta_translate) also the
    image shifted one pixel down-right and one up-left (edges repeated), weighted 1/2 for the unshifted
    views and 1/4 for each shifted one, as airbench does. 2, 3 or 6 forward passes an image."""

    def __init__(self, net: nn.Module, flip: bool = True, translate: bool = False):
        super().__init__()
        self.net, self.flip, self.translate = net, flip, translate

    def _views(self, x):
        return (self.net(x) + self.net(x.flip(3))) / 2 if self.flip else self.net(x)

    def forward(self, x):
        if self.training:
            return self.net(x)
        if not self.translate:
            return self._views(x)
        h, w = x.shape[2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        shifted = (padded[:, :, :h, :w], padded[:, :, 2:, 2:])  # the content moved down-right, up-left
        return self._views(x) / 2 + sum(self._views(s) for s in shifted) / 4


def tudui(config: dict, pretrained: bool) -> Tudui:
    return Tudui(config["in_channels"], tuple(config["input_size"]), config["num_classes"])


def fast_cnn(config: dict, pretrained: bool) -> FastCNN:
    return FastCNN(config["in_channels"], config["num_classes"], config["widths"], config["convs"],
                   config.get("pool", "last"), config.get("identity_init", False))


def vgg16(config: dict, pretrained: bool) -> nn.Module:
    """torchvision's VGG16 with `classifier[6] = nn.Linear(4096, num_classes)`, as the tutorial does.

    Inputs from 32×32 up work unchanged: the five 2×2 max-pools leave a 1×1 map at 32 px, which
    AdaptiveAvgPool2d((7, 7)) repeats to the 7×7 that the 25088-wide classifier (and its ImageNet
    weights) expects. For 1-channel data the first conv takes one input channel (see fit_channels).
    """
    import torchvision  # 2-3 s to import: only the nets that need it pay for it

    net = load_imagenet(torchvision.models.vgg16(), "vgg16") if pretrained else torchvision.models.vgg16()
    net.features[0] = fit_channels(net.features[0], config["in_channels"], pretrained)
    net.classifier[6] = nn.Linear(4096, config["num_classes"])
    return net


def resnet18(config: dict, pretrained: bool) -> nn.Module:
    """torchvision's ResNet18 with `fc` replaced for the class count.

    With `small_input_stem` (inputs under 64 px, such as 32×32 CIFAR-10 and padded MNIST) the stem is
    CIFAR-style: conv1 is a 3×3 stride-1 conv and the max-pool is dropped, so a 32×32 input reaches
    layer4 as 4×4 instead of 1×1. That conv1 is freshly initialised even with ImageNet weights (the
    7×7 stride-2 ImageNet kernels do not fit it); every other layer but fc gets them. With the
    ImageNet stem, 1-channel data gets a 1-channel conv1 (see fit_channels).
    """
    import torchvision

    net = load_imagenet(torchvision.models.resnet18(), "resnet18") if pretrained else torchvision.models.resnet18()
    if config["small_input_stem"]:
        net.conv1 = nn.Conv2d(config["in_channels"], 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
        net.maxpool = nn.Identity()
    else:
        net.conv1 = fit_channels(net.conv1, config["in_channels"], pretrained)
    net.fc = nn.Linear(net.fc.in_features, config["num_classes"])
    return net


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[dict, bool], nn.Module]  # (config, pretrained) -> the net, its head fitted to the classes
    head: str                   # its replaced last layer: the only one trained with model.freeze_backbone
    min_size: int = 1           # input policy: smallest height and width it accepts ...
    multiple_of: int = 1        # ... and what they must be multiples of
    weights: str | None = None  # ImageNet weights file (model.pretrained), looked up in the torch hub cache
    options: Callable[[list[int]], dict] = lambda input_shape: {}  # config entries that follow from the input


MODELS = {
    "cifar10_quick": ModelEntry(tudui, head="model.8", multiple_of=8),
    "fast_cnn": ModelEntry(fast_cnn, head="head", min_size=8,
                           options=lambda shape: {"widths": [32, 64, 128], "convs": [1, 1, 2]}),
    # the fast recipe's: six convs, two a stage, airbench's pool order and identity init; about the cost of
    # fast_cnn per image
    "fast_cnn6": ModelEntry(fast_cnn, head="head", min_size=8,
                            options=lambda shape: {"widths": [32, 64, 128], "convs": [2, 2, 2], "pool": "first",
                                                   "identity_init": True}),
    # the short recipe's: fast_cnn at half the width with one conv a stage, ~3× cheaper per image
    "fast_cnn_small": ModelEntry(fast_cnn, head="head", min_size=8,
                                 options=lambda shape: {"widths": [16, 32, 64], "convs": [1, 1, 1]}),
    # the CIFAR-10 GPU recipe's: airbench94's layout (64/256/256 channels, two convs a stage, pool first)
    "airbench": ModelEntry(fast_cnn, head="head", min_size=8,
                           options=lambda shape: {"widths": [64, 256, 256], "convs": [2, 2, 2], "pool": "first"}),
    "vgg16": ModelEntry(vgg16, head="classifier.6", min_size=32, weights="vgg16-397923af.pth"),
    "resnet18": ModelEntry(resnet18, head="fc", weights="resnet18-f37072fd.pth",
                           options=lambda shape: {"small_input_stem": min(shape[1:]) < 64}),
}


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
    """Where torchvision caches `name`'s ImageNet weights: <torch.hub.get_dir()>/checkpoints/<file>.

    Raises PipelineError naming the file and the folder when it is not there; never downloads."""
    file = MODELS[name].weights
    if file is None:
        with_weights = [n for n, entry in MODELS.items() if entry.weights]
        raise PipelineError(f"model.pretrained: true needs a model with ImageNet weights "
                            f"({', '.join(with_weights)}); {name} has none")
    path = Path(torch.hub.get_dir()) / "checkpoints" / file
    if not path.is_file():
        raise PipelineError(f"model.pretrained: {file} is not in {path.parent} and is never downloaded here; "
                            f"fetch {WEIGHTS_URL}{file} elsewhere and put it in that folder (TORCH_HOME moves it), "
                            "or set model.pretrained: false")
    return path


def load_imagenet(net: nn.Module, name: str) -> nn.Module:
    """`net` with `name`'s ImageNet weights from the torch hub cache."""
    path = imagenet_weights_path(name)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download makes torch.load raise almost anything
        raise PipelineError(f"{path} is not a readable PyTorch file ({exc.__class__.__name__}); "
                            "delete it and fetch it again") from None
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        raise PipelineError(f"{path} does not fit {net.__class__.__name__} ({one_line(exc)})") from None
    return net


def model_config(name: str, input_shape: list[int], num_classes: int, tta_flip: bool = False,
                 tta_translate: bool = False) -> dict:
    """The dict a model file stores so that `build_model` can rebuild the same net, without downloads;
    PipelineError when the input does not fit the model's input policy."""
    entry = MODELS[name]
    h, w = input_shape[1:]
    if min(h, w) < entry.min_size:
        raise PipelineError(f"{name} needs inputs of at least {entry.min_size}×{entry.min_size}, got {h}×{w} "
                            f"(set preprocess.pad_to or preprocess.image_size to {entry.min_size} or more)")
    if h % entry.multiple_of or w % entry.multiple_of:
        raise PipelineError(f"{name} needs height and width divisible by {entry.multiple_of}, got {h}×{w} "
                            "(set preprocess.pad_to, e.g. 32)")
    config = {"name": name, "in_channels": input_shape[0], "input_size": [h, w], "num_classes": num_classes,
              **entry.options(input_shape)}
    if tta_flip:
        config["tta_flip"] = True
    if tta_translate:
        config["tta_translate"] = True
    return config


def build_model(config: dict, pretrained: bool = False) -> nn.Module:
    """The net `config` describes; with `pretrained`, every layer that is not replaced or refitted starts
    from the ImageNet weights in the torch hub cache (PipelineError when they are not there)."""
    if config["name"] not in MODELS:
        raise PipelineError(f"unknown model {config['name']!r}; allowed: {', '.join(MODELS)}")
    if pretrained:
        imagenet_weights_path(config["name"])  # a model without ImageNet weights, or none in the cache: one line
    net = MODELS[config["name"]].build(config, pretrained)
    flip, translate = bool(config.get("tta_flip")), bool(config.get("tta_translate"))
    return ViewAveraged(net, flip, translate) if flip or translate else net


def plain_net(model: nn.Module) -> nn.Module:
    """The net itself, without the test-time augmentation build_model may wrap it in."""
    return model.net if isinstance(model, ViewAveraged) else model


def freeze_backbone(model: nn.Module, name: str) -> None:
    """Leave requires_grad only in the replaced last layer (BatchNorm running statistics still update in
    train mode, as in the PyTorch transfer-learning tutorial)."""
    model.requires_grad_(False)
    plain_net(model).get_submodule(MODELS[name].head).requires_grad_(True)


WHITEN_IMAGES = 10_000  # training images whose 3×3 patches give the whitening filters (sorted order: no sampling)
WHITEN_EPS = 5e-4       # added to each patch variance: keeps the noisiest directions from blowing up


def whitening_filters(images: torch.Tensor) -> torch.Tensor:
    """airbench's patch-whitening filters for normalized N×C×H×W `images`: the eigenvectors of the covariance
    of their 3×3 patches, in ascending order of eigenvalue, each divided by sqrt(eigenvalue + WHITEN_EPS):
    9·C filters of shape C×3×3."""
    channels, count, total, outer = images.shape[1], 0, 0, 0
    for chunk in images.split(1000):  # the patches of 10,000 images would take ~0.6 GB at once
        patches = nn.functional.unfold(chunk.double(), 3, padding=1).transpose(1, 2).reshape(-1, 9 * channels)
        count, total, outer = count + len(patches), total + patches.sum(0), outer + patches.T @ patches
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
    values, vectors = torch.linalg.eigh(covariance)
    return (vectors.T / torch.sqrt(values + WHITEN_EPS)[:, None]).float().reshape(-1, channels, 3, 3)


def whiten_first_conv(model: nn.Module, name: str, images: torch.Tensor | None) -> None:
    """model.whiten: the first conv of a fast_cnn net starts as patch whitening of the training `images`
    (whitening_filters: as many of the largest-variance ones as half its outputs hold, then their negatives,
    which the ReLU after them needs to keep both signs; the rest stay random) and is not trained, as in
    airbench. `images` None (resuming): the weights come from the checkpoint, only the freezing is done."""
    if MODELS[name].build is not fast_cnn:
        fitting = [n for n, entry in MODELS.items() if entry.build is fast_cnn]
        raise PipelineError(f"model.whiten: true needs a net whose first layer is a 3×3 conv ({', '.join(fitting)}); "
                            f"{name} is not one")
    conv = plain_net(model).features[0]
    if images is not None:
        filters = whitening_filters(images)
        filters = filters[len(filters) - min(len(filters), conv.out_channels // 2):]
        with torch.no_grad():
            conv.weight[:2 * len(filters)] = torch.cat([filters, -filters])
    conv.requires_grad_(False)
