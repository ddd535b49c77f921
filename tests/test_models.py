"""The tutorial's CIFAR10-quick ("Tudui") net, layer by layer."""
import pytest
import torch

from stages.lib.errors import PipelineError
from stages.lib.nets import Tudui, build_model, model_config


def test_tutorial_shapes_layer_by_layer():
    # The tutorial prints torch.Size([64, 10]) for a 64×3×32×32 input; these are the shapes in between.
    net = Tudui(in_channels=3, input_size=(32, 32), num_classes=10)
    x = torch.ones(64, 3, 32, 32)
    shapes = []
    for layer in net.model:
        x = layer(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(64, 32, 32, 32), (64, 32, 16, 16), (64, 32, 16, 16), (64, 32, 8, 8),
                      (64, 64, 8, 8), (64, 64, 4, 4), (64, 1024), (64, 64), (64, 10)]
    assert net(torch.ones(64, 3, 32, 32)).shape == torch.Size([64, 10])
    assert net.model[7].in_features == 1024


def test_parameter_count_matches_the_tutorial_net():
    net = Tudui(3, (32, 32), 10)
    expected = (3 * 32 * 25 + 32) + (32 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (1024 * 64 + 64) + (64 * 10 + 10)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_grayscale_input_and_other_class_counts():
    net = build_model(model_config("cifar10_quick", [1, 32, 32], 7))
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    assert net.model[0].in_channels == 1


def test_sizes_the_net_cannot_take_are_refused():
    with pytest.raises(PipelineError, match="cifar10_quick needs height and width divisible by 8, got 28×28"):
        model_config("cifar10_quick", [1, 28, 28], 10)
    with pytest.raises(PipelineError, match="vgg16 needs inputs of at least 32×32, got 28×28"):
        model_config("vgg16", [1, 28, 28], 10)
    with pytest.raises(PipelineError, match="allowed: cifar10_quick"):
        build_model({"name": "vgg99", "in_channels": 1, "input_size": [32, 32], "num_classes": 10})
