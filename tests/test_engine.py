"""The training-loop pieces of the fast recipe: the onecycle schedule, weight averaging, flip test-time
augmentation baked into the model, and the fast_cnn net."""
import pytest
import torch
from torch import nn

from conftest import make_params
from stages.lib.training import WeightAverage, learning_rate
from stages.lib.nets import FastCNN, ViewAveraged, build_model, freeze_backbone, model_config
from stages.train import fingerprint


def test_constant_schedule_is_the_tutorials():
    assert {learning_rate(step, 100, 0.01, "constant", 0.2) for step in range(100)} == {0.01}


def test_onecycle_rises_to_the_peak_then_falls_to_zero():
    rates = [learning_rate(step, 100, 0.5, "onecycle", 0.2) for step in range(100)]
    assert rates[0] == pytest.approx(0.5 / 20) and rates[19] == pytest.approx(0.5) and max(rates) == rates[19]
    assert all(a < b for a, b in zip(rates[:19], rates[1:20]))
    assert all(a > b for a, b in zip(rates[19:], rates[20:]))
    assert rates[-1] == 0.0


def test_onecycle_length_counts_for_resume_but_constant_does_not():
    meta = {"sha256": "x"}
    constant = [fingerprint(make_params({"train": {"epochs": e}}), meta) for e in (1, 2)]
    onecycle = [fingerprint(make_params({"train": {"epochs": e, "schedule": "onecycle"}}), meta) for e in (1, 2)]
    assert constant[0] == constant[1] and onecycle[0] != onecycle[1]


def test_weight_average_follows_the_weights_with_its_decay():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(net, decay=0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.train()(torch.rand(4, 2))  # moves the BatchNorm statistics and bumps its counter
    average.update()  # first update: decay min(0.5, 2/11)
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(average.model[0].weight, expected)
    assert average.model[1].num_batches_tracked == net[1].num_batches_tracked == 1
    assert not average.model.training and not any(p.requires_grad for p in average.model.parameters())

    restored = WeightAverage(net, decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1 and torch.equal(restored.model[0].weight, average.model[0].weight)


def test_flip_averaging_in_eval_mode_only():
    torch.manual_seed(0)
    net = FastCNN(1, 10, [8, 16, 32], [1, 1, 1])
    wrapped = ViewAveraged(net)
    x = torch.rand(3, 1, 28, 28)
    wrapped.train()
    assert torch.equal(wrapped(x), net(x))
    wrapped.eval()
    with torch.no_grad():
        assert torch.allclose(wrapped(x), (net(x) + net(x.flip(3))) / 2)
        assert torch.allclose(wrapped(x), wrapped(x.flip(3)), atol=1e-6)  # a mirror gets the same answer


def test_translate_averaging_weighs_the_shifted_views_a_quarter_each():
    torch.manual_seed(0)
    net = FastCNN(1, 10, [8, 16, 32], [1, 1, 1]).eval()
    x = torch.rand(3, 1, 28, 28)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    down_right, up_left = padded[:, :, :28, :28], padded[:, :, 2:, 2:]
    assert torch.equal(down_right[:, :, 1:, 1:], x[:, :, :27, :27]) and torch.equal(up_left[:, :, :27, :27], x[:, :, 1:, 1:])
    with torch.no_grad():
        both = ViewAveraged(net, flip=True, translate=True).eval()(x)
        flip = lambda v: (net(v) + net(v.flip(3))) / 2
        assert torch.allclose(both, flip(x) / 2 + (flip(down_right) + flip(up_left)) / 4, atol=1e-6)
        alone = ViewAveraged(net, flip=False, translate=True).eval()(x)
        assert torch.allclose(alone, net(x) / 2 + (net(down_right) + net(up_left)) / 4, atol=1e-6)
        assert (alone - both).abs().max() > 1e-4  # the two settings differ: the test can tell them apart


def test_tta_flag_travels_in_the_config_and_freezing_still_finds_the_head():
    config = model_config("fast_cnn", [1, 28, 28], 10, tta_flip=True)
    assert config == {"name": "fast_cnn", "in_channels": 1, "input_size": [28, 28], "num_classes": 10,
                      "widths": [32, 64, 128], "convs": [1, 1, 2], "tta_flip": True}
    model = build_model(config)
    assert isinstance(model, ViewAveraged) and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert (model.flip, model.translate) == (True, False)
    translated = build_model(model_config("fast_cnn", [1, 28, 28], 10, tta_translate=True))
    assert (translated.flip, translated.translate) == (False, True)
    assert "tta_flip" not in model_config("fast_cnn", [1, 28, 28], 10)  # off: the config is as it always was
    freeze_backbone(model, "fast_cnn")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"net.head.weight", "net.head.bias"}


def test_fast_cnn_layers_pool_after_each_stage_last_conv():
    net = FastCNN(1, 10, [8, 16, 32], [1, 1, 2])
    kinds = [type(layer).__name__ for layer in net.features]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] * 2 + [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)  # 28 -> 14 -> 7 -> 3, then the global max
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_pool_first_nets_pool_after_each_stages_first_conv():
    """fast_cnn6 and airbench (airbench's order): conv, pool, BN, ReLU, then the stage's other conv at the
    pooled size; fast_cnn keeps its pool after the stage's last conv."""
    net = build_model(model_config("fast_cnn6", [1, 28, 28], 10))
    sizes, x = [], torch.zeros(2, 1, 28, 28)
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            sizes.append(x.shape[-1])
    assert sizes == [28, 14, 14, 7, 7, 3] and net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    airbench = build_model(model_config("airbench", [3, 32, 32], 10))
    assert [m.out_channels for m in airbench.features if isinstance(m, nn.Conv2d)] == [64, 64, 256, 256, 256, 256]
    old = FastCNN(1, 10, [8, 16], [2, 1])  # a model file written before `pool` existed rebuilds as it was
    assert [type(m).__name__ for m in old.features][:3] == ["Conv2d", "BatchNorm2d", "ReLU"]


def test_identity_init_makes_equal_width_convs_pass_their_input_through():
    """fast_cnn6 starts each stage's second conv as the identity (airbench's dirac init); the convs that change
    the width keep their random init, drawn from the same random numbers as without the option."""
    torch.manual_seed(0)
    plain = FastCNN(1, 10, [8, 16], [2, 2], "first")
    torch.manual_seed(0)
    identity = FastCNN(1, 10, [8, 16], [2, 2], "first", identity_init=True)
    pairs = [(p, i) for p, i in zip(plain.features, identity.features) if isinstance(p, nn.Conv2d)]
    assert [p.in_channels == p.out_channels for p, _ in pairs] == [False, True, False, True]
    for p, i in pairs:
        if p.in_channels == p.out_channels:
            x = torch.randn(2, p.in_channels, 5, 5)
            assert torch.equal(i(x), x)
        else:
            assert torch.equal(p.weight, i.weight)
    assert build_model(model_config("fast_cnn6", [1, 28, 28], 10)).features[4].weight[:, :, 1, 1].equal(torch.eye(32))
    assert "identity_init" not in model_config("fast_cnn", [1, 28, 28], 10)


def test_evaluate_in_bf16_close_to_fp32_and_leaves_an_enclosing_autocast_alone():
    from stages.lib.device import use_bf16
    from stages.lib.loader import BatchLoader
    from stages.lib.training import logits_of, loss_and_accuracy
    from stages.lib.transforms import Preprocess

    def evaluate(net, loader, bf16=False):
        loss, accuracy = loss_and_accuracy(*logits_of(net, loader, bf16), loader.batch_size)
        return {"loss": loss, "accuracy": accuracy}

    torch.manual_seed(0)
    net = FastCNN(1, 10, [8, 16, 32], [1, 1, 1]).eval()
    images, labels = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (64,))
    loader = BatchLoader(images, labels, 32, Preprocess([28, 28], [28, 28], [0.3], [0.3]))
    fp32, bf16 = evaluate(net, loader), evaluate(net, loader, bf16=True)
    assert fp32["loss"] == pytest.approx(bf16["loss"], rel=0.05) and fp32["loss"] != bf16["loss"]

    seen = []
    net.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fit validates a bf16-trained net under its autocast
        evaluate(net, loader)
    assert set(seen) == {torch.bfloat16}
    assert use_bf16("fp32", torch.device("cpu")) is False and use_bf16("bf16", torch.device("cpu")) is True
    assert use_bf16("auto", torch.device("cpu")) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
