"""predict — classify image files with a trained model (the tutorial's test.py, made real).

    python -m stages.predict shoe.png shirt.jpg [--model models/model.pt] [--top 3] [--invert] [--json]

Any image Pillow reads works: it is converted to the model's channels (alpha composited onto black),
resized to the training image size, padded like the training data and normalized with its statistics.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.checkpoint import load_model
from stages.data import pad_images
from stages.engine import make_normalizer
from stages.errors import PipelineError, run

MAX_PIXELS = 64_000_000  # refuse larger images (decompression bombs) before decoding them


def load_image(path: Path, channels: int, size: list[int], invert: bool = False) -> torch.Tensor:
    """An image file -> uint8 tensor C×H×W at the training image size (before padding)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: {'no such file' if not path.exists() else 'not a file'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise PipelineError(f"{path}: {image.width}×{image.height} is too large to decode safely")
                image = ImageOps.exif_transpose(image)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PipelineError(f"{path}: image is too large to decode safely") from None
    except UnidentifiedImageError:
        raise PipelineError(f"{path}: not a readable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise PipelineError(f"{path}: damaged image ({' '.join(str(exc).split())})") from None
    try:
        image = to_channels(image, channels)
    except ValueError as exc:  # e.g. LAB or CMYK-with-alpha TIFFs, which Pillow cannot convert
        raise PipelineError(f"{path}: unsupported {image.mode} image ({exc})") from None
    if invert:
        image = ImageOps.invert(image)
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    tensor = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return tensor.view(size[0], size[1], channels).permute(2, 0, 1).contiguous()


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> L (channels=1) or RGB, with transparency composited onto black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale (Pillow opens some as I): to 8 bits
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode in ("P", "PA", "LA", "RGBA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def predict(model, ckpt: dict, paths: list[Path], top: int = 3, invert: bool = False) -> list[dict]:
    spec = ckpt["input"]
    batch = pad_images(torch.stack([load_image(p, spec["channels"], spec["size"], invert) for p in paths]),
                       spec["pad_to"][0])
    normalize = make_normalizer(ckpt["normalization"]["mean"], ckpt["normalization"]["std"], torch.device("cpu"))
    with torch.inference_mode():
        probs = model(normalize(batch)).softmax(1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [{"image": str(p), "top": [{"class": ckpt["classes"][i], "probability": round(v, 4)}
                                      for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(paths, values, indices)]


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, BMP, ...)")
    parser.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file from train")
    parser.add_argument("--top", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--invert", action="store_true",
                        help="invert gray levels (Fashion-MNIST items are light on black; photos are usually dark on white)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> None:
    if args.top < 1:
        raise PipelineError(f"--top must be at least 1, got {args.top}")
    model, ckpt = load_model(args.model)
    missing = [key for key in ("classes", "input", "normalization") if key not in ckpt]
    if missing:
        raise PipelineError(f"{args.model} lacks {', '.join(missing)}: use the finished model "
                            "(models/model.pt), not a training checkpoint")
    results = predict(model, ckpt, args.images, args.top, args.invert)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return
    for result in results:
        shown = "  ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
        print(f"{result['image']}: {shown}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
