"""Stage 4 — evaluate: the trained model on the held-out test split.

Writes metrics/eval.json (accuracy, mean loss, per-class accuracy) and metrics/confusion.csv
(one `actual,predicted` row per test image, for DVC's confusion-matrix plot).
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from stages.checkpoint import load_model
from stages.data import load_split
from stages.engine import evaluate, make_normalizer, resolve_device
from stages.errors import run
from stages.files import write_json, write_text
from stages.params import load_params

MODEL_PATH = Path("models/model.pt")
METRICS_PATH, CONFUSION_PATH = Path("metrics/eval.json"), Path("metrics/confusion.csv")


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


def main(args) -> None:
    params = load_params()
    device = resolve_device("auto")
    model, ckpt = load_model(MODEL_PATH, device)
    model = model.to(memory_format=torch.channels_last)
    images, labels = load_split("test", device=device)
    normalize = make_normalizer(ckpt["normalization"]["mean"], ckpt["normalization"]["std"], device)
    began = time.perf_counter()
    result = evaluate(model, images, labels, normalize, params["evaluate"]["batch_size"])
    seconds = time.perf_counter() - began
    metrics = split_metrics(labels, result["predictions"], ckpt["classes"], result["loss"])
    write_json(METRICS_PATH, metrics)
    write_text(CONFUSION_PATH, confusion_csv(labels, result["predictions"], ckpt["classes"]))
    print(f"test accuracy {metrics['test_accuracy']:.4f}, loss {metrics['test_loss']:.4f} on "
          f"{len(labels)} images in {seconds:.2f}s ({device}); wrote {METRICS_PATH}, {CONFUSION_PATH}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
