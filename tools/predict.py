"""predict — classify image files with a trained model (the tutorial's test.py, made real).

    python -m tools.predict shoe.png shirt.jpg [--model models/model.pt] [--top 3] [--invert] [--json]

Any image Pillow reads works: it is converted to the model's channels (alpha composited onto black),
resized to the training image size, padded like the training data and normalized with its statistics.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stages.lib.errors import PipelineError, run
from stages.lib.images import ImageError, read_image_file
from stages.lib.modelfile import ModelFile, load_model
from stages.lib.paths import MODEL


def read_images(model_file: ModelFile, paths: list[Path], invert: bool = False) -> torch.Tensor:
    """Image files -> uint8 N×C×H×W as the model's data set stores its images (stages/lib/images.py,
    the decoding the served model runs too)."""
    spec = model_file.input
    try:
        return torch.stack([torch.from_numpy(read_image_file(path, spec["channels"], spec["size"], invert,
                                                             spec["resize"])) for path in paths])
    except ImageError as exc:
        raise PipelineError(str(exc)) from None


def predict(model, model_file: ModelFile, paths: list[Path], top: int = 3, invert: bool = False) -> list[dict]:
    images = read_images(model_file, paths, invert)
    with torch.inference_mode():
        probs = model(model_file.preprocess()(images)).softmax(1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    results = []
    for path, vs, ix in zip(paths, values, indices):
        top = [{"class": model_file.classes[i], "probability": round(v, 4)} for v, i in zip(vs.tolist(), ix.tolist())]
        # the served model's row ({class, probability, top}), with the file it came from
        results.append({"image": str(path), "class": top[0]["class"], "probability": top[0]["probability"], "top": top})
    return results


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, ...)")
    parser.add_argument("--model", type=Path, default=MODEL, help="model file from train")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--invert", action="store_true",
                        help="invert gray levels (Fashion-MNIST items are light on black; photos are usually dark on white)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> None:
    if args.top < 1:
        raise PipelineError(f"--top must be at least 1, got {args.top}")
    model, model_file = load_model(args.model)
    results = predict(model, model_file, args.images, args.top, args.invert)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    for result in results:
        shown = "  ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{result['image']}: {shown}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
