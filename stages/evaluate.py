"""Stage 4 — evaluate: the trained model on the held-out test split.

Writes metrics/eval.json (test accuracy and mean loss: the numbers experiments are compared by),
metrics/per_class.csv (accuracy and image count per class, a bar chart in `dvc plots`) and
metrics/confusion.csv (one `actual,predicted` row per test image, DVC's confusion-matrix plot); adds
them to the training's MLflow run with a confusion-matrix picture and a per-class table.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from stages.lib.data import load_split
from stages.lib.engine import evaluate, resolve_device, set_threads, use_bf16
from stages.lib.errors import run
from stages.lib.files import csv_bytes, json_bytes, write_files
from stages.lib.loader import BatchLoader
from stages.lib.modelfile import load_model
from stages.lib.params import load_params
from stages.lib.tracking import Tracker

MODEL_PATH = Path("models/model.pt")
METRICS_PATH, PER_CLASS_PATH = Path("metrics/eval.json"), Path("metrics/per_class.csv")
CONFUSION_PATH = Path("metrics/confusion.csv")


def per_class(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> list[dict]:
    """[{"class", "accuracy" (None without test images), "images"}] in class order."""
    labels, predicted = labels.cpu(), predicted.cpu()
    rows = []
    for index, name in enumerate(classes):
        mask = labels == index
        accuracy = round((predicted[mask] == index).float().mean().item(), 6) if mask.any() else None
        rows.append({"class": name, "accuracy": accuracy, "images": int(mask.sum())})
    return rows


def confusion_csv(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> bytes:
    return csv_bytes([{"actual": classes[a], "predicted": classes[p]}
                      for a, p in zip(labels.tolist(), predicted.tolist())])


def confusion_image(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str], cell: int = 44):
    """A confusion-matrix heat map as a PIL image (rows: actual, columns: predicted, counts in cells)."""
    from PIL import Image, ImageDraw

    n = len(classes)
    counts = torch.zeros(n, n, dtype=torch.int64)
    counts.index_put_((labels.cpu(), predicted.cpu()), torch.ones(len(labels), dtype=torch.int64), accumulate=True)
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
    draw.text((left, top + n * cell + 8), "rows: actual, columns: predicted", fill="black")
    return image


def main(args) -> None:
    params = load_params()
    set_threads(params.threads)
    device = resolve_device("auto")
    model, model_file = load_model(MODEL_PATH, device)
    model = model.to(memory_format=torch.channels_last)
    images, labels = load_split("test", device=device)
    began = time.perf_counter()
    result = evaluate(model, BatchLoader(images, labels, params.evaluate.batch_size, model_file.normalizer(device)),
                      bf16=use_bf16(params.evaluate.precision, device))
    seconds = time.perf_counter() - began
    metrics = {"test_accuracy": round(result["accuracy"], 6), "test_loss": round(result["loss"], 6)}
    classes = per_class(labels, result["predictions"], model_file.classes)
    write_files({METRICS_PATH: json_bytes(metrics), PER_CLASS_PATH: csv_bytes(classes),
                 CONFUSION_PATH: confusion_csv(labels, result["predictions"], model_file.classes)})
    tracker = Tracker.resume(params.tracking)
    tracker.log_test(metrics, classes, step=model_file.epoch)
    for path in (METRICS_PATH, PER_CLASS_PATH, CONFUSION_PATH):
        tracker.log_artifact(path, "metrics")
    if tracker.active:
        with tempfile.TemporaryDirectory() as tmp:
            picture = Path(tmp) / "confusion.png"
            confusion_image(labels, result["predictions"], model_file.classes).save(picture, format="PNG")
            tracker.log_artifact(picture, "metrics")
    print(f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} on "
          f"{len(labels)} images in {seconds:.2f}s ({device}); wrote {METRICS_PATH}, {PER_CLASS_PATH}, {CONFUSION_PATH}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
