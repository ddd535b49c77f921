"""Stage 4 — evaluate: the trained model on the held-out test split.

Writes metrics/eval.json (accuracy, mean loss, per-class accuracy), metrics/confusion.csv
(one `actual,predicted` row per test image, for DVC's confusion-matrix plot) and metrics/confusion.png;
adds them to the training's MLflow run.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from stages.lib.data import load_split
from stages.lib.engine import evaluate, resolve_device, set_threads, use_bf16
from stages.lib.errors import run
from stages.lib.files import json_bytes, write_files
from stages.lib.loader import BatchLoader
from stages.lib.modelfile import load_model
from stages.lib.params import load_params
from stages.lib.tracking import Tracker

MODEL_PATH = Path("models/model.pt")
METRICS_PATH, CONFUSION_PATH = Path("metrics/eval.json"), Path("metrics/confusion.csv")
CONFUSION_IMAGE = Path("metrics/confusion.png")


def split_metrics(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str], loss: float) -> dict:
    labels, predicted = labels.cpu(), predicted.cpu()
    per_class = {}
    for index, name in enumerate(classes):
        mask = labels == index
        per_class[name] = round((predicted[mask] == index).float().mean().item(), 6) if mask.any() else None
    return {"test_accuracy": round((predicted == labels).float().mean().item(), 6),
            "test_loss": round(loss, 6), "test_images": len(labels), "per_class_accuracy": per_class}


def confusion_csv(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), predicted.tolist()))
    return buffer.getvalue()


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
    classes = model_file.classes
    metrics = split_metrics(labels, result["predictions"], classes, result["loss"])
    png = io.BytesIO()
    confusion_image(labels, result["predictions"], classes).save(png, format="PNG")
    write_files({METRICS_PATH: json_bytes(metrics),
                 CONFUSION_PATH: confusion_csv(labels, result["predictions"], classes).encode(),
                 CONFUSION_IMAGE: png.getvalue()})
    tracker = Tracker.resume(params.tracking)
    tracker.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
                         **{f"test_accuracy/{k}": v for k, v in metrics["per_class_accuracy"].items()}},
                        step=model_file.epoch)
    for path in (METRICS_PATH, CONFUSION_PATH, CONFUSION_IMAGE):
        tracker.log_artifact(path, "metrics")
    print(f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} on "
          f"{len(labels)} images in {seconds:.2f}s ({device}); wrote {METRICS_PATH}, {CONFUSION_PATH}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
