"""torchvision models (vgg16, resnet18), ImageNet weights from the hub cache only, frozen backbones, and
batch augmentation. VGG16 is heavy on CPU (138M parameters): batches of 2, and its random init runs once."""
import copy
import functools
import socket

import pytest
import torch
import torchvision
from torch import nn

from conftest import make_params
from stages.lib.loader import make_augmenter
from stages.lib.errors import PipelineError
from stages.lib.nets import MODELS, build_model, freeze_backbone, model_config
from stages.lib.training import fit
from stages.train import fingerprint

SHAPES = {"gray32": [1, 32, 32], "rgb32": [3, 32, 32], "rgb64": [3, 64, 64]}  # (Fashion-)MNIST, CIFAR-10, folder
RESNET18_FILE = "resnet18-f37072fd.pth"


def built(name, shape, classes, pretrained=False):
    torch.manual_seed(0)
    return build_model(model_config(name, shape, classes), pretrained)


@functools.cache
def vgg16_template(vgg16=torchvision.models.vgg16) -> nn.Module:
    with torch.random.fork_rng():  # leaves the global RNG as it was
        return vgg16()


@pytest.fixture(autouse=True)
def vgg16_initialised_once(monkeypatch):
    """torchvision's random init of VGG16 takes seconds on CPU and is not under test: every build starts
    from a copy of one instance (the first-conv and head replacements in stages.lib.nets still run)."""
    monkeypatch.setattr(torchvision.models, "vgg16", lambda: copy.deepcopy(vgg16_template()))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds stand-in "ImageNet" resnet18 weights (random, seeded)."""
    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(123)
    weights = torchvision.models.resnet18().state_dict()
    (home / "hub/checkpoints").mkdir(parents=True)
    torch.save(weights, home / "hub/checkpoints" / RESNET18_FILE)
    return home, weights


@pytest.mark.parametrize("classes", [10, 2])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", ["cifar10_quick", "fast_cnn", "resnet18", "vgg16"])
def test_every_model_builds_and_backpropagates_on_every_data_shape(name, shape, classes):
    net = built(name, shape, classes)
    logits = net(torch.rand(2, *shape))
    assert logits.shape == (2, classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and p.grad.any() for p in net.parameters())
    head = net.get_submodule(MODELS[name].head)
    assert isinstance(head, nn.Linear) and head.out_features == classes
    if name == "vgg16":
        assert head is net.classifier[6] and head.in_features == 4096


def test_resnet18_uses_the_cifar_stem_below_64_pixels():
    assert model_config("resnet18", [1, 32, 32], 10)["small_input_stem"] is True
    assert model_config("resnet18", [3, 64, 64], 10)["small_input_stem"] is False
    small, large = built("resnet18", [1, 32, 32], 10), built("resnet18", [1, 64, 64], 10)
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity)
    assert (large.conv1.in_channels, large.conv1.kernel_size, large.conv1.stride) == (1, (7, 7), (2, 2))
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_inputs_too_small_for_vgg16_are_refused():
    with pytest.raises(PipelineError, match="at least 32×32"):
        build_model(model_config("vgg16", [1, 16, 16], 10))


@pytest.mark.parametrize("name, data", [("cifar10_quick", "rgb32"), ("resnet18", "gray32"), ("resnet18", "rgb64"),
                                        ("vgg16", "gray32")])
def test_checkpoint_config_rebuilds_the_same_net_without_downloads(name, data, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    shape = SHAPES[data]
    net = built(name, shape, 3).eval()
    torch.manual_seed(1)  # other random weights, replaced by the saved ones
    rebuilt = build_model(model_config(name, shape, 3))
    rebuilt.load_state_dict(net.state_dict())
    x = torch.rand(2, *shape)
    with torch.no_grad():
        assert torch.equal(net(x), rebuilt.eval()(x))


@pytest.mark.parametrize("name, file", [("vgg16", "vgg16-397923af.pth"), ("resnet18", RESNET18_FILE)])
def test_missing_imagenet_weights_name_the_file_and_folder(name, file, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PipelineError) as error:
        build_model(model_config(name, [3, 32, 32], 10), pretrained=True)
    assert f"{file} is not in {tmp_path / 'hub' / 'checkpoints'}" in str(error.value)
    assert not any(tmp_path.iterdir())


def test_models_without_imagenet_weights_and_damaged_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PipelineError, match="vgg16, resnet18"):
        build_model(model_config("cifar10_quick", [3, 32, 32], 10), pretrained=True)
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    (tmp_path / "hub/checkpoints" / RESNET18_FILE).write_bytes(b"half a download")
    with pytest.raises(PipelineError, match="not a readable PyTorch file"):
        build_model(model_config("resnet18", [3, 32, 32], 10), pretrained=True)


def test_resnet18_starts_from_the_cached_imagenet_weights(imagenet_resnet18, monkeypatch, no_network):
    home, imagenet = imagenet_resnet18
    monkeypatch.setenv("TORCH_HOME", str(home))
    rgb = built("resnet18", [3, 64, 64], 10, pretrained=True).state_dict()
    gray = built("resnet18", [1, 64, 64], 10, pretrained=True).state_dict()
    small = built("resnet18", [1, 32, 32], 10, pretrained=True).state_dict()
    for key, value in imagenet.items():
        if key.startswith("fc."):
            assert rgb[key].shape[0] == 10  # replaced for the class count
        elif key == "conv1.weight":
            assert torch.equal(rgb[key], value)
            assert torch.equal(gray[key], value.sum(1, keepdim=True))  # RGB kernels summed for gray input
            assert small[key].shape == (64, 1, 3, 3)  # the small-input stem is new
        else:
            assert torch.equal(rgb[key], value) and torch.equal(gray[key], value) and torch.equal(small[key], value)


@pytest.mark.parametrize("name, data", [("resnet18", "rgb32"), ("vgg16", "gray32")])
def test_frozen_backbone_trains_only_the_head(name, data):
    shape = SHAPES[data]
    net = built(name, shape, 2)
    freeze_backbone(net, name)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"{MODELS[name].head}.weight", f"{MODELS[name].head}.bias"}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(net(torch.rand(2, *shape)), torch.tensor([0, 1])).backward()
    optimizer.step()
    assert {n for n, p in net.named_parameters() if not torch.equal(p, before[n])} == trainable


def tiny_data(shape, classes=2, n_train=16, n_val=8):
    """Random uint8 images and labels shaped like a prepared data set, plus its meta."""
    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),  # noqa: E731
                       torch.randint(0, classes, (n,), generator=g))
    meta = {"input_shape": shape, "classes": [str(i) for i in range(classes)], "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0], "sha256": "tiny"}
    return meta, {"train": split(n_train), "val": split(n_val)}


def test_fit_with_a_frozen_pretrained_backbone_updates_only_the_head(imagenet_resnet18, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(imagenet_resnet18[0]))
    meta, data = tiny_data([3, 32, 32])
    params = make_params({"model": {"name": "resnet18", "pretrained": True, "freeze_backbone": True},
                          "train": {"batch_size": 8, "weight_decay": 1.0e-2, "momentum": 0.9}})
    result = list(fit(params, meta, data, torch.device("cpu")))[-1]
    model, ckpt = result.model, result.checkpoint
    start = built("resnet18", [3, 32, 32], 2, pretrained=True)  # fit seeds with params["seed"] == 0 too
    changed = {n for (n, a), b in zip(model.named_parameters(), start.parameters()) if not torch.equal(a, b)}
    assert changed == {"fc.weight", "fc.bias"}
    assert ckpt["optimizer"]["param_groups"][0]["params"] == [0, 1]  # the optimizer holds only the head


def test_fit_uses_augmentation_only_when_asked():
    meta, data = tiny_data([1, 32, 32])
    plain = [epoch.row for epoch in fit(make_params({"train": {"batch_size": 8}}), meta, data, torch.device("cpu"))]
    augmented = make_params({"train": {"batch_size": 8, "augment_crop": 4, "augment_flip": True}})
    assert [epoch.row for epoch in fit(augmented, meta, data, torch.device("cpu"))] != plain


def test_fingerprint_covers_the_new_settings():
    meta = {"sha256": "tiny"}
    base = fingerprint(make_params(), meta)
    for overrides in ({"model": {"name": "resnet18"}}, {"model": {"pretrained": True}},
                      {"model": {"pretrained": True, "freeze_backbone": True}}, {"train": {"augment_crop": 4}},
                      {"train": {"augment_flip": True}}):
        assert fingerprint(make_params(overrides), meta) != base, overrides


def random_batch(n=8, channels=3, size=8, dtype=torch.uint8):
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(0)).to(dtype)


def test_augmentation_off_is_no_augmenter_and_draws_nothing():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    assert make_augmenter(0, False, generator) is None
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augmentation_is_seeded_and_keeps_shape_and_dtype(dtype):
    images = random_batch(dtype=dtype)
    first, again = (make_augmenter(2, True, torch.Generator().manual_seed(5))(images) for _ in range(2))
    assert first.shape == images.shape and first.dtype == dtype
    assert torch.equal(first, again) and not torch.equal(first, images)
    assert not torch.equal(first, make_augmenter(2, True, torch.Generator().manual_seed(6))(images))


def test_flip_mirrors_some_images_left_right_and_keeps_the_others():
    images = random_batch(n=16)
    out = make_augmenter(0, True, torch.Generator().manual_seed(5))(images)
    mirrored = [torch.equal(o, i.flip(2)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_crop_cuts_a_random_window_out_of_the_zero_padded_image():
    images, pad = random_batch(size=6), 2
    out = make_augmenter(pad, False, torch.Generator().manual_seed(5))(images)
    padded = nn.functional.pad(images, (pad,) * 4)
    offsets = []
    for o, p in zip(out, padded):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(o, p[:, dy:dy + 6, dx:dx + 6])]
        assert len(found) == 1
        offsets += found
    assert len(set(offsets)) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_the_gpu_matches_the_cpu():
    images = random_batch()
    cpu = make_augmenter(3, True, torch.Generator().manual_seed(5))(images)
    gpu = make_augmenter(3, True, torch.Generator().manual_seed(5))(images.cuda())
    assert torch.equal(cpu, gpu.cpu())
