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


def test_whitening_filters_decorrelate_the_patches_and_fit_the_first_conv():
    from stages.lib.nets import whiten_first_conv, whitening_filters

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 28, 28, generator=generator)
    images[..., 1:] += images[..., :-1].clone()  # neighbouring pixels correlated, as in real images
    filters = whitening_filters(images)
    assert filters.shape == (9, 1, 3, 3)
    patches = torch.nn.functional.unfold(images, 3, padding=1)  # 64 × 9 × 784
    features = torch.einsum("fk,nkp->fnp", filters.reshape(9, 9), patches).reshape(9, -1)
    assert torch.allclose(torch.cov(features), torch.eye(9), atol=0.01)  # unit variance, uncorrelated

    # fast_cnn6's first conv has 32 outputs: the 9 filters and their negatives, the other 14 stay as initialised
    model = build_model(model_config("fast_cnn6", [1, 28, 28], 10, tta_flip=True))
    untouched = model.net.features[0].weight[18:].clone()
    whiten_first_conv(model, "fast_cnn6", images)
    conv = model.net.features[0]
    assert torch.equal(conv.weight[:18], torch.cat([filters, -filters])) and torch.equal(conv.weight[18:], untouched)
    assert not conv.weight.requires_grad and model.net.head.weight.requires_grad
    # fast_cnn_small's has 16: the 8 largest-variance directions and their negatives
    small = build_model(model_config("fast_cnn_small", [1, 28, 28], 10))
    whiten_first_conv(small, "fast_cnn_small", images)
    assert torch.equal(small.features[0].weight[:8], filters[1:9])
    assert torch.equal(small.features[0].weight[8:], -filters[1:9])

    with pytest.raises(PipelineError, match=r"^model.whiten: true needs .*fast_cnn6.*; cifar10_quick is not one$"):
        whiten_first_conv(build_model(model_config("cifar10_quick", [1, 32, 32], 10)), "cifar10_quick", images)
