"""evaluate and export on a really trained (tiny) model."""
import csv
import json

import onnx
import onnxruntime
import pytest
import torch

from stages.lib.data import load_split
from stages.lib.modelfile import load_model
from stages.lib.models import build_model


def test_eval_metrics_match_a_recomputation(trained_project):
    metrics = json.loads((trained_project / "metrics/eval.json").read_text())
    model, ckpt = load_model(trained_project / "models/model.pt")
    images, labels = load_split("test", trained_project / "data/prepared")
    normalize = ckpt.normalizer()
    with torch.inference_mode():
        predicted = model(normalize(images)).argmax(1)
    assert set(metrics) == {"test_accuracy", "test_loss"}  # only the numbers experiments are compared by
    assert abs(metrics["test_accuracy"] - (predicted == labels).float().mean().item()) < 1e-6
    per_class = list(csv.DictReader((trained_project / "metrics/per_class.csv").open()))
    assert [row["class"] for row in per_class] == ckpt.classes and sum(int(r["images"]) for r in per_class) == 200
    for index, row in enumerate(per_class):
        mask = labels == index
        if mask.any():
            assert float(row["accuracy"]) == pytest.approx((predicted[mask] == index).float().mean().item(), abs=1e-6)

    rows = list(csv.DictReader((trained_project / "metrics/confusion.csv").open()))
    assert len(rows) == 200 and set(rows[0]) == {"actual", "predicted"}
    assert [r["actual"] for r in rows] == [ckpt.classes[i] for i in labels.tolist()]
    assert [r["predicted"] for r in rows] == [ckpt.classes[i] for i in predicted.tolist()]


def test_exported_state_dict_and_onnx_agree_with_the_model(trained_project):
    export = trained_project / "models/export"
    model, ckpt = load_model(trained_project / "models/model.pt")
    plain = build_model(ckpt.config)
    plain.load_state_dict(torch.load(export / "state_dict.pt", weights_only=True))
    plain.eval()

    images, _ = load_split("test", trained_project / "data/prepared")
    x = ckpt.normalizer()(images[:50]).contiguous()
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(plain(x), expected)

    session = onnxruntime.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": x.numpy()})  # 50 images: the batch axis is dynamic
    assert got.shape == (50, 10)
    assert (torch.from_numpy(got) - expected).abs().max() < 1e-4
    props = {p.key: json.loads(p.value) for p in onnx.load(str(export / "model.onnx")).metadata_props}
    assert props["classes"] == ckpt.classes and props["mean"] == ckpt.normalization["mean"]

    report = json.loads((trained_project / "metrics/export.json").read_text())
    assert report["onnx_max_abs_diff"] < 1e-4 and report["onnx_check_images"] == 32
    card = (export / "MODEL_CARD.md").read_text()
    eval_metrics = json.loads((trained_project / "metrics/eval.json").read_text())
    assert f"Test accuracy {eval_metrics['test_accuracy']}" in card and "Ankle boot" in card
