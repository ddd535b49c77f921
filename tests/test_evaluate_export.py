"""evaluate and export on a really trained (tiny) model."""
import csv
import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import onnxruntime
import torch

from conftest import make_params, run_stage
from stages.export import export_onnx
from stages.lib.prepared import load_split
from stages.lib.modelfile import load_model
from stages.lib.nets import ViewAveraged, build_model
from stages.lib.transforms import pad_images, unpad


def test_eval_metrics_match_a_recomputation(trained_project):
    metrics = json.loads((trained_project / "metrics/eval.json").read_text())
    model, ckpt = load_model(trained_project / "models/model.pt")
    images, labels = load_split("test", trained_project / "data/prepared")
    normalize = ckpt.preprocess(padded=True)
    with torch.inference_mode():
        logits = model(normalize(images))
    predicted = logits.argmax(1)
    assert {"test_accuracy", "test_loss"} <= set(metrics)  # the numbers experiments are compared by
    assert abs(metrics["test_accuracy"] - (predicted == labels).float().mean().item()) < 1e-6
    per_class = list(csv.DictReader((trained_project / "metrics/per_class.csv").open()))
    assert [row["class"] for row in per_class] == ckpt.classes and sum(int(r["images"]) for r in per_class) == 200
    for index, row in enumerate(per_class):
        mask = labels == index
        if mask.any():
            assert float(row["accuracy"]) == pytest.approx((predicted[mask] == index).float().mean().item(), abs=1e-6)

    rows = list(csv.DictReader((trained_project / "metrics/predictions.csv").open()))
    assert len(rows) == 200 and list(rows[0]) == ["index", "actual", "predicted", "probability"]
    assert [int(r["index"]) for r in rows] == list(range(200))
    assert [r["actual"] for r in rows] == [ckpt.classes[i] for i in labels.tolist()]
    assert [r["predicted"] for r in rows] == [ckpt.classes[i] for i in predicted.tolist()]
    top = logits.float().softmax(1).max(1).values.tolist()
    assert [float(r["probability"]) for r in rows] == pytest.approx(top, abs=1e-4)


def raw_test_images(project, n: int) -> torch.Tensor:
    """The first n test images as the data set stores them (data/raw), uint8 N×1×28×28: no preprocessing."""
    from stages.lib.datasets import DATASETS

    raw = DATASETS["fashion_mnist"].read(project / "data/raw/fashion_mnist", make_params().preprocess)
    return raw.test[0][:n].unsqueeze(1).contiguous()


def test_exported_state_dict_agrees_with_the_model(trained_project):
    export = trained_project / "models/export"
    model, ckpt = load_model(trained_project / "models/model.pt")
    plain = build_model(ckpt.config)
    plain.load_state_dict(torch.load(export / "state_dict.pt", weights_only=True))
    plain.eval()
    images, _ = load_split("test", trained_project / "data/prepared")
    x = ckpt.preprocess(padded=True)(images[:50]).contiguous()
    with torch.inference_mode():
        assert torch.equal(plain(x), model(x))


def test_onnx_takes_raw_uint8_images_and_agrees_with_pytorch(trained_project):
    """Parity: ONNX Runtime given the data set's own uint8 test images, PyTorch given the prepared
    (padded) tensors exactly as evaluate computes them."""
    model, ckpt = load_model(trained_project / "models/model.pt")
    raw = raw_test_images(trained_project, 50)
    prepared, _ = load_split("test", trained_project / "data/prepared")
    assert torch.equal(pad_images(raw, 32), prepared[:50])  # the same images, before preprocess padded them
    with torch.inference_mode():
        expected = model(ckpt.preprocess(padded=True)(prepared[:50]))
    assert (expected - expected[0]).abs().max() > 1e-3  # the model tells the images apart: the check below means something

    session = onnxruntime.InferenceSession(str(trained_project / "models/export/model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert (image.name, image.type, image.shape[1:]) == ("image", "tensor(uint8)", [1, 28, 28])
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    logits, probabilities = session.run(None, {"image": raw.numpy()})  # 50 images: the batch axis is dynamic
    assert logits.shape == probabilities.shape == (50, 10)
    assert (torch.from_numpy(logits) - expected).abs().max() < 1e-4
    assert (torch.from_numpy(probabilities) - expected.softmax(1)).abs().max() < 1e-5
    assert np.array_equal(probabilities.argmax(1), expected.argmax(1).numpy())

    props = {p.key: json.loads(p.value) for p in onnx.load(str(trained_project / "models/export/model.onnx")).metadata_props}
    assert props["classes"] == ckpt.classes and props["mean"] == ckpt.normalization["mean"]
    assert props["input"] == {"channels": 1, "size": [28, 28], "pad_to": [32, 32], "resize": "stretch"}
    report = json.loads((trained_project / "metrics/export.json").read_text())
    assert report["onnx_max_abs_diff"] < 1e-4 and report["onnx_probabilities_max_abs_diff"] < 1e-5
    assert report["onnx_check_images"] == 32


def test_predict_preprocessing_is_training_s_bit_for_bit(trained_project):
    """The one preprocessing (Preprocess, also in the ONNX graph) on raw images gives exactly the tensors
    training's loader gives on the padded prepared split, and the raw-image net the same logits."""
    model, ckpt = load_model(trained_project / "models/model.pt")
    raw = raw_test_images(trained_project, 50)
    prepared, _ = load_split("test", trained_project / "data/prepared")
    trained_input = ckpt.preprocess(padded=True)(prepared[:50])
    assert torch.equal(ckpt.preprocess()(raw), trained_input)
    assert torch.equal(unpad(prepared[:50], [28, 28]), raw)
    with torch.inference_mode():
        logits, probabilities = ckpt.raw_net(model)(raw)
        assert torch.equal(logits, model(trained_input))
    assert torch.allclose(probabilities.sum(1), torch.ones(50))


@pytest.mark.parametrize("translate", [False, True])
def test_tta_is_inside_the_onnx_graph(trained_project, tmp_path, translate):
    """With model.tta_flip (and tta_translate) the net averages each image's logits over its views; model.onnx must too."""
    _, ckpt = load_model(trained_project / "models/model.pt")
    tta = dataclasses.replace(ckpt, config={**ckpt.config, "tta_flip": True, "tta_translate": translate},
                              state_dict={f"net.{k}": v for k, v in ckpt.state_dict.items()})  # ViewAveraged.net
    net = tta.build()
    assert isinstance(net, ViewAveraged) and net.translate == translate
    raw = raw_test_images(trained_project, 20)
    path = tmp_path / "tta.onnx"
    export_onnx(tta.raw_net(net), raw[:1], path, {"classes": tta.classes})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, _ = session.run(None, {"image": raw.numpy()})
    x = ckpt.preprocess()(raw)
    with torch.inference_mode():
        plain, mirrored = net.net(x), net.net(x.flip(3))
    assert (plain - mirrored).abs().max() > 1e-3  # the mirror changes the answer: the test can tell TTA apart
    with torch.inference_mode():
        expected = net(x)
    assert (torch.from_numpy(logits) - expected).abs().max() < 1e-4
    if not translate:
        assert torch.allclose(expected, (plain + mirrored) / 2)
    else:  # the shifted views change the answer too
        assert (expected - (plain + mirrored) / 2).abs().max() > 1e-3


def test_model_card_describes_the_raw_input_and_how_to_serve(trained_project):
    card = (trained_project / "models/export/MODEL_CARD.md").read_text()
    eval_metrics = json.loads((trained_project / "metrics/eval.json").read_text())
    assert f"test_accuracy {eval_metrics['test_accuracy']}" in card and "Ankle boot" in card
    assert "uint8 N×1×28×28" in card and "zero-pads it to 32×32" in card
    assert "`logits`" in card and "`probabilities`" in card
    assert "make serve" in card and "curl" in card and "base64" in card


@pytest.mark.slow
def test_export_is_byte_identical_from_another_folder(trained_project, tmp_path):
    """DVC reruns export in copies (queued experiments run under .dvc/tmp/exps/): the same model must give
    the same files, byte for byte, wherever it is exported."""
    folder = tmp_path / "another" / "checkout"
    shutil.copytree(trained_project, folder)
    shutil.rmtree(folder / "models/export")
    result = run_stage(folder, "export")
    assert result.returncode == 0, result.stderr
    for name in ("model.onnx", "state_dict.pt", "MODEL_CARD.md"):
        assert (folder / "models/export" / name).read_bytes() == (trained_project / "models/export" / name).read_bytes(), name
