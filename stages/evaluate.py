"""Stage 4 — evaluate: the trained model on the held-out test split.

Runs the model once over the test images for their logits; every metric is computed from those in
`test_metrics` (the one place to add one: it then shows in metrics/eval.json, `dvc exp show`, MLflow and
the model card, and needs no retraining). Writes metrics/eval.json (the numbers experiments are compared by),
metrics/per_class.csv (accuracy and image count per class, a bar chart in `dvc plots`) and
metrics/predictions.csv (one `index,actual,predicted,probability` row per test image: DVC's
confusion-matrix plot, and `make flips` between two experiments); adds them to the training's MLflow run
with a confusion-matrix picture, a per-class table and the predictions as a table.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from stages.lib.errors import run
from stages.lib.files import csv_bytes, json_bytes, write_files
from stages.lib.loader import BatchLoader
from stages.lib.modelfile import load_model
from stages.lib.params import load_params
from stages.lib.paths import EVAL_METRICS, MODEL, PER_CLASS, PREDICTIONS
from stages.lib.prepared import load_split
from stages.lib.provenance import Inputs
from stages.lib.tracking.runs import Tracker
from stages.lib.device import resolve_device, set_threads, use_bf16
from stages.lib.training import logits_of, loss_and_accuracy


def test_metrics(logits: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict:
    """metrics/eval.json: what experiments are compared by."""
    loss, accuracy = loss_and_accuracy(logits, labels, batch_size)
    return {"test_accuracy": round(accuracy, 6), "test_loss": round(loss, 6)}


def per_class(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> list[dict]:
    """[{"class", "accuracy" (None without test images), "images"}] in class order."""
    labels, predicted = labels.cpu(), predicted.cpu()
    rows = []
    for index, name in enumerate(classes):
        mask = labels == index
        accuracy = round((predicted[mask] == index).float().mean().item(), 6) if mask.any() else None
        rows.append({"class": name, "accuracy": accuracy, "images": int(mask.sum())})
    return rows


def predictions(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict]:
    """One row per test image in the test split's order: its index, true class, predicted class and the
    predicted class's softmax probability (4 decimals: the file stays small, ~35 bytes a row)."""
    probability, predicted = logits.float().softmax(1).max(1)
    return [{"index": i, "actual": classes[a], "predicted": classes[p], "probability": f"{q:.4f}"}
            for i, (a, p, q) in enumerate(zip(labels.tolist(), predicted.tolist(), probability.tolist()))]


def confusion_image(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str], cell: int = 44):
    """A confusion-matrix heat map as a PIL image, oriented like `dvc plots`' confusion plot (columns:
    actual, rows: predicted, counts in cells)."""
    from PIL import Image, ImageDraw

    n = len(classes)
    counts = torch.zeros(n, n, dtype=torch.int64)
    counts.index_put_((predicted.cpu(), labels.cpu()), torch.ones(len(labels), dtype=torch.int64), accumulate=True)
    left, top = 110, 110
    image = Image.new("RGB", (left + n * cell + 10, top + n * cell + 30), "white")
    draw = ImageDraw.Draw(image)
    peak = max(int(counts.max()), 1)
    for a in range(n):
        draw.text((4, top + a * cell + cell // 2 - 6), classes[a][:16], fill="black")
        label = Image.new("RGB", (top - 10, 14), "white")
        ImageDraw.Draw(label).text((2, 1), classes[a][:16], fill="black")
        image.paste(label.rotate(90, expand=True), (left + a * cell + cell // 2 - 7, 6))
        for p in range(n):
            value = int(counts[a, p])
            shade = 255 - int(215 * value / peak)
            box = (left + p * cell, top + a * cell, left + (p + 1) * cell - 1, top + (a + 1) * cell - 1)
            draw.rectangle(box, fill=(shade, shade, 255) if a != p else (shade, 255, shade))
            draw.text((box[0] + 4, box[1] + cell // 2 - 6), str(value), fill="black" if shade > 110 else "white")
    draw.text((left, top + n * cell + 8), "columns: actual, rows: predicted", fill="black")
    return image


def main(args) -> None:
    inputs = Inputs.read("evaluate")
    params = load_params()
    set_threads(params.threads)
    device = resolve_device("auto")
    model, model_file = load_model(MODEL, device)
    model = model.to(memory_format=torch.channels_last)
    images, labels = load_split("test", device=device)
    batch_size = params.evaluate.batch_size
    began = time.perf_counter()
    logits, labels = logits_of(model, BatchLoader(images, labels, batch_size, model_file.preprocess(padded=True).to(device)),
                               bf16=use_bf16(params.evaluate.precision, device))
    seconds = time.perf_counter() - began
    metrics, predicted = test_metrics(logits, labels, batch_size), logits.argmax(1)
    classes = per_class(labels, predicted, model_file.classes)
    rows = predictions(logits, labels, model_file.classes)
    inputs.verify()
    write_files({EVAL_METRICS: json_bytes(metrics), PER_CLASS: csv_bytes(classes), PREDICTIONS: csv_bytes(rows)})
    tracker = Tracker.resume(params.tracking)
    tracker.log_test(metrics, classes, rows, step=model_file.epoch)
    for path in (EVAL_METRICS, PER_CLASS):
        tracker.log_artifact(path, "metrics")
    if tracker.active:
        with tempfile.TemporaryDirectory() as tmp:
            picture = Path(tmp) / "confusion.png"
            confusion_image(labels, predicted, model_file.classes).save(picture, format="PNG")
            tracker.log_artifact(picture, "metrics")
    shown = ", ".join(f"{key} {value:.4f}" for key, value in metrics.items())
    print(f"{shown} on {len(labels)} images in {seconds:.2f}s ({device}); wrote {EVAL_METRICS}, {PER_CLASS}, {PREDICTIONS}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
