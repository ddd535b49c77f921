"""predict (`python -m tools.predict IMAGE...`) and the safety of loading model files.

Everything runs in-process on the shared `trained_project` except two CLI runs (one success, one failure).
The fixture's model is trained for one epoch on 500 images, so it is a poor classifier: tests compare
whole probability vectors and preprocessed tensors, not just top-1 labels, so that they stay meaningful.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import random
import shlex
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import run_stage
from tools import predict as P
from stages.lib.errors import PipelineError
from stages.lib.images import MAX_PIXELS, ImageError, decode_image, read_image_file
from stages.lib.modelfile import FORMAT, ModelFile, load_model, read_torch_file

N_PARITY = 20


@pytest.fixture(scope="module")
def loaded(trained_project):
    return load_model(trained_project / "models/model.pt")


@pytest.fixture(scope="module")
def test_images(trained_project):
    """The first N prepared test images: (uint8 N×1×32×32 as training saw them, uint8 N×28×28 crops)."""
    split = torch.load(trained_project / "data/prepared/test.pt", weights_only=True)
    padded = split["images"][:N_PARITY]
    assert padded.shape == (N_PARITY, 1, 32, 32) and padded.dtype == torch.uint8
    crops = padded[:, 0, 2:30, 2:30]
    border = padded.clone()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any(), "prepared images are not 28×28 zero-padded by 2: the crop would be wrong"
    return padded, crops.numpy()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, test_images):
    """Grayscale PNGs of the test images, in order."""
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, array in enumerate(test_images[1]):
        path = folder / f"test{i:02d}.png"
        Image.fromarray(array, "L").save(path)
        paths.append(path)
    return paths


def top1(result: dict) -> str:
    return result["top"][0]["class"]


def check_probabilities(result: dict, classes: list[str]) -> None:
    names = [t["class"] for t in result["top"]]
    probs = [t["probability"] for t in result["top"]]
    assert sorted(names) == sorted(classes)
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1, abs=1e-3)  # ten values rounded to 4 decimals


def model_input(ckpt: ModelFile) -> tuple[int, list[int]]:
    return ckpt.input["channels"], ckpt.input["size"]


def load_image(path: Path, channels: int, size: list[int], invert: bool = False) -> torch.Tensor:
    return torch.from_numpy(read_image_file(path, channels, size, invert))


# --- 1. parity with training's preprocessing ----------------------------------------------------------

def test_predict_matches_the_model_on_the_prepared_tensors(loaded, test_images, pictures):
    model, ckpt = loaded
    padded, _ = test_images
    normalize = ckpt.preprocess(padded=True)
    with torch.inference_mode():
        expected = model(normalize(padded)).softmax(1)
    # the check below is only informative if the model does not answer the same for every image
    assert (expected - expected[0]).abs().max() > 1e-3

    # the one preprocessing: image files -> exactly the tensors training fed the net
    assert torch.equal(ckpt.preprocess()(P.read_images(ckpt, pictures)), normalize(padded))
    results = P.predict(model, ckpt, pictures, top=len(ckpt.classes))
    assert [r["image"] for r in results] == [str(p) for p in pictures]
    for result, probs in zip(results, expected):
        check_probabilities(result, ckpt.classes)
        assert top1(result) == ckpt.classes[probs.argmax().item()]
        got = {t["class"]: t["probability"] for t in result["top"]}
        for name, p in zip(ckpt.classes, probs.tolist()):
            assert got[name] == pytest.approx(p, abs=1e-4), name


# --- 2. image formats ----------------------------------------------------------------------------------

def save_rgba_transparent_background(gray: np.ndarray, path: Path) -> None:
    """Black pixels fully transparent over a red color, the rest opaque: composited onto black = gray."""
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    rgba[gray == 0] = (255, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(path)


def save_pgm16(gray: np.ndarray, path: Path) -> None:
    h, w = gray.shape
    path.write_bytes(b"P5\n%d %d\n65535\n" % (w, h) + (gray.astype(">u2") * 257).tobytes())


LOSSLESS = {  # name -> (writer, the modes Pillow may open the file in)
    "rgb.png": (lambda g, p: Image.fromarray(g, "L").convert("RGB").save(p), ("RGB",)),
    "rgba.png": (lambda g, p: Image.fromarray(g, "L").convert("RGBA").save(p), ("RGBA",)),
    "rgba_transparent.png": (save_rgba_transparent_background, ("RGBA",)),
    "palette.png": (lambda g, p: Image.fromarray(g, "L").convert("P").save(p), ("P",)),
    "gray16.png": (lambda g, p: Image.fromarray(g.astype(np.uint16) * 257).save(p), ("I;16",)),
    "gray16.pgm": (save_pgm16, ("I", "I;16", "I;16B")),
    "gray.bmp": (lambda g, p: Image.fromarray(g, "L").save(p), ("L",)),
    "lossless.webp": (lambda g, p: Image.fromarray(g, "L").save(p, lossless=True), ("RGB", "L")),
    # 32-bit float TIFFs as scientific software writes them: 0..1, or 0..255
    "float01.tiff": (lambda g, p: Image.fromarray(g.astype(np.float32) / 255, "F").save(p), ("F",)),
    "float255.tiff": (lambda g, p: Image.fromarray(g.astype(np.float32), "F").save(p), ("F",)),
}


@pytest.mark.parametrize("scale, message", [(1000.0, "from 0 to 1000"), (-1.0, "from -1 to")])
def test_float_images_outside_0_255_are_refused_clearly(scale, message, tmp_path):
    path = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28) * scale, "F").save(path)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path, 1, [28, 28])
    assert str(info.value).startswith(f"{path}: unsupported F image (float pixel values")


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_formats_give_the_same_input_and_answer_as_grayscale_png(name, loaded, test_images, pictures,
                                                                         tmp_path):
    model, ckpt = loaded
    writer, modes = LOSSLESS[name]
    paths = []
    for i in range(3):
        path = tmp_path / f"{i}_{name}"
        writer(test_images[1][i], path)
        with Image.open(path) as image:
            assert image.mode in modes, "the file does not exercise the intended conversion"
        paths.append(path)
        assert torch.equal(load_image(path, *model_input(ckpt)), load_image(pictures[i], *model_input(ckpt)))
        assert torch.equal(load_image(path, *model_input(ckpt))[0], torch.from_numpy(test_images[1][i]))
        # the served model decodes the same bytes with the same code
        assert np.array_equal(decode_image(io.BytesIO(path.read_bytes()), *model_input(ckpt)), test_images[1][i][None])
    results = P.predict(model, ckpt, paths, top=1)
    assert [top1(r) for r in results] == [top1(r) for r in P.predict(model, ckpt, pictures[:3], top=1)]


def test_cmyk_jpeg_is_close_to_the_grayscale_picture(loaded, test_images, tmp_path):
    # JPEG is lossy, so only closeness of the preprocessed input is asserted, not an equal top-1;
    # a CMYK file read with inverted inks would be off by ~255, not by a few levels
    model, ckpt = loaded
    gray = test_images[1][0]
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(gray, "L").convert("CMYK").save(path, quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
    x = load_image(path, *model_input(ckpt))
    assert x.shape == (1, 28, 28)
    assert (x[0].int() - torch.from_numpy(gray).int()).abs().max() <= 24
    [result] = P.predict(model, ckpt, [path], top=10)
    check_probabilities(result, ckpt.classes)


def test_larger_images_are_resized_to_the_training_size(loaded, test_images, tmp_path):
    # resizing changes pixels, so the resized input is compared with the original, not the top-1
    model, ckpt = loaded
    gray = test_images[1][0]
    big = tmp_path / "big.png"
    Image.fromarray(gray, "L").resize((280, 280), Image.Resampling.NEAREST).save(big)
    wide = tmp_path / "wide.jpg"
    Image.fromarray(gray, "L").convert("RGB").resize((600, 400)).save(wide)
    x = load_image(big, *model_input(ckpt))
    assert x.shape == (1, 28, 28)
    assert (x[0].float() - torch.from_numpy(gray).float()).abs().mean() < 8
    assert load_image(wide, *model_input(ckpt)).shape == (1, 28, 28)
    for result in P.predict(model, ckpt, [big, wide], top=10):
        check_probabilities(result, ckpt.classes)


def test_color_pictures_become_luma(loaded, test_images, tmp_path):
    # all the pictures above are gray (R = G = B); here the channels differ, so taking one channel
    # instead of the luma (ITU-R 601, as Pillow's "L") would show
    _, ckpt = loaded
    gray = test_images[1][0].astype(np.float64)
    rgb = np.dstack([gray, np.full_like(gray, 40), 255 - gray]).astype(np.uint8)
    path = tmp_path / "color.png"
    Image.fromarray(rgb, "RGB").save(path)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    x = load_image(path, *model_input(ckpt))[0].double()
    assert (x - torch.from_numpy(luma)).abs().max() <= 1


def test_invert_flips_gray_levels(loaded, test_images, pictures):
    _, ckpt = loaded
    plain = load_image(pictures[0], *model_input(ckpt))
    assert torch.equal(load_image(pictures[0], *model_input(ckpt), invert=True), 255 - plain)


# --- 3. unreadable images ------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG claiming width×height, with a few bytes of pixel data: decoding it would fail as truncated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def make_bad(kind: str, folder: Path, good: Path) -> Path:
    path = folder / {"missing": "missing.png", "directory": "folder.png", "empty": "empty.png",
                     "text": "notes.png", "truncated_jpeg": "cut.jpg", "truncated_png": "cut.png"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a shopping list, not a picture\n")
    elif kind == "truncated_jpeg":
        with Image.open(good) as image:
            image.save(folder / "whole.jpg", quality=90)
        whole = (folder / "whole.jpg").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "truncated_png":
        whole = good.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("directory", "not a file"),
    ("empty", "not a readable image"),
    ("text", "not a readable image"),
    ("truncated_jpeg", "damaged image"),
    ("truncated_png", "damaged image"),
])
def test_unreadable_images_are_a_pipeline_error_naming_the_file(kind, message, loaded, pictures, tmp_path):
    model, ckpt = loaded
    bad = make_bad(kind, tmp_path, pictures[0])
    with pytest.raises(PipelineError) as info:
        P.predict(model, ckpt, [pictures[0], bad])
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value)


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any attempt to decode pixel data fail the test."""
    def refuse(self):
        raise AssertionError(f"decoded {self.size} pixels of an image that should have been refused")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_decompression_bomb_is_refused_before_decoding(loaded, tmp_path, no_decoding):
    _, ckpt = loaded
    side = 9000
    assert side * side > MAX_PIXELS
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)  # ~10 MB in memory, a 10 kB file
    assert bomb.stat().st_size < 100_000
    began = time.perf_counter()
    with pytest.raises(ImageError, match="too large") as info:
        load_image(bomb, *model_input(ckpt))
    assert time.perf_counter() - began < 1
    assert str(info.value).startswith(f"{bomb}: ")


@pytest.mark.parametrize("width, height", [(8001, 8000), (10_000, 10_000), (20_000, 20_000), (1, 70_000_000)])
def test_huge_headers_are_refused_before_decoding(width, height, loaded, tmp_path, no_decoding):
    # sizes past our limit and past Pillow's own warning (89 M pixels) and error (179 M) thresholds;
    # had any been decoded, its few bytes of data would have given "damaged image" instead
    _, ckpt = loaded
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path, *model_input(ckpt))
    assert str(info.value).startswith(f"{path}: ")


def test_png_header_helper_is_a_real_png(tmp_path):
    """The control for the test above: a small header from png_header opens, then fails to decode."""
    path = tmp_path / "small.png"
    path.write_bytes(png_header(100, 100))
    with Image.open(path) as image:
        assert image.size == (100, 100)
    with pytest.raises(ImageError, match="damaged image"):
        load_image(path, 1, [28, 28])


# --- 4. --top -------------------------------------------------------------------------------------------

def parse(trained_project: Path, *argv: str, model: str = "models/model.pt") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    P.add_arguments(parser)
    return parser.parse_args([*argv, "--model", str(trained_project / model)])


def test_top_larger_than_the_class_count_is_clamped(loaded, pictures):
    model, ckpt = loaded
    [result] = P.predict(model, ckpt, pictures[:1], top=50)
    assert len(result["top"]) == len(ckpt.classes) == 10
    check_probabilities(result, ckpt.classes)
    [short] = P.predict(model, ckpt, pictures[:1], top=2)
    assert short["top"] == result["top"][:2]


@pytest.mark.parametrize("top", ["0", "-3"])
def test_top_below_one_is_an_error(top, trained_project, pictures):
    with pytest.raises(PipelineError, match="--top"):
        P.main(parse(trained_project, str(pictures[0]), "--top", top))


def test_main_prints_one_line_per_image(trained_project, pictures, capsys):
    P.main(parse(trained_project, str(pictures[0]), str(pictures[1]), "--top", "2"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(pictures[0]), str(pictures[1])]
    assert all(line.count("%") == 2 for line in lines)


def test_training_checkpoint_is_not_a_finished_model(trained_project, pictures):
    # models/checkpoint.pt has weights but no class names or preprocessing: a clear error, not a KeyError
    with pytest.raises(PipelineError, match="lacks classes"):
        P.main(parse(trained_project, str(pictures[0]), model="models/checkpoint.pt"))


# --- 5. loading model files safely ----------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_valid_model_file_loads(loaded):
    model, ckpt = loaded
    assert isinstance(ckpt, ModelFile) and ckpt.epoch == 1 and not model.training
    saved = torch.load(io.BytesIO(ckpt.to_bytes()), weights_only=True)  # a round trip gives the same file
    assert saved["format"] == FORMAT and saved["classes"] == ckpt.classes


def test_malicious_torch_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "model": {}, "state_dict": Payload(marker)}, evil)
    with pytest.raises(PipelineError, match="refused") as info:
        read_torch_file(evil)
    assert str(evil) in str(info.value) and "system" in str(info.value)
    assert not marker.exists()
    # control: the file really is dangerous when loaded the unsafe way
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_malicious_plain_pickle_is_refused_without_running_it(protocol, tmp_path, recwarn):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"format": FORMAT, "x": Payload(marker)}, protocol=protocol))
    with pytest.raises(PipelineError) as info:
        read_torch_file(evil)
    assert str(info.value).startswith(str(evil))
    assert not marker.exists()
    assert not [w for w in recwarn if "torch" in w.filename], "torch warnings would add lines to the one-line error"
    pickle.loads(evil.read_bytes())  # control
    assert marker.exists()


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_not_a_pytorch_file(seed, tmp_path):
    rng = random.Random(seed)
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([7, 200, 4096]))))
    with pytest.raises(PipelineError, match="is not a readable PyTorch file") as info:
        read_torch_file(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04 half a zip"])
def test_damaged_files_are_not_a_pytorch_file(content, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="is not a readable PyTorch file"):
        read_torch_file(path)


def test_truncated_model_file_is_not_a_pytorch_file(trained_project, tmp_path):
    whole = (trained_project / "models/model.pt").read_bytes()
    path = tmp_path / "model.pt"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PipelineError, match="is not a readable PyTorch file"):
        load_model(path)


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2], torch.zeros(3), {"format": "other/1"}])
def test_other_torch_files_are_not_model_files(obj, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(obj, path)
    with pytest.raises(PipelineError, match="not a model file of this pipeline"):
        read_torch_file(path)


def test_missing_paths_are_a_pipeline_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        read_torch_file(tmp_path / "nothing.pt")
    with pytest.raises(PipelineError, match="is not a file"):
        read_torch_file(tmp_path)


def test_model_file_without_weights_is_damaged(trained_project, tmp_path):
    ckpt = torch.load(trained_project / "models/model.pt", weights_only=True)
    del ckpt["state_dict"]
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    with pytest.raises(PipelineError, match="lacks state_dict"):
        load_model(path)


def test_weights_for_another_class_count_are_a_clear_mismatch(trained_project, tmp_path):
    ckpt = torch.load(trained_project / "models/model.pt", weights_only=True)
    assert ckpt["model"]["num_classes"] == 10
    ckpt["model"]["num_classes"] = 7
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    assert read_torch_file(path)["model"]["num_classes"] == 7  # readable; only the weights do not fit
    with pytest.raises(PipelineError, match="weights do not fit") as info:
        load_model(path)
    assert str(info.value).startswith(str(path)) and "size mismatch" in str(info.value)


# --- the command line (two subprocesses) ----------------------------------------------------------------

def test_cli_json_matches_in_process_predict(trained_project, loaded, pictures, tmp_path):
    model, ckpt = loaded
    jpeg = tmp_path / "photo.jpg"
    with Image.open(pictures[1]) as image:
        image.convert("RGB").save(jpeg)
    paths = [pictures[0], jpeg]
    result = run_stage(trained_project, "tools.predict", *map(str, paths), "--json", "--top", "3")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = P.predict(model, ckpt, paths, top=3)
    assert [r["image"] for r in printed] == [str(p) for p in paths]
    for got, want in zip(printed, expected):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        assert [t["probability"] for t in got["top"]] == pytest.approx([t["probability"] for t in want["top"]],
                                                                       abs=2e-4)


def test_cli_refuses_a_malicious_model_with_one_error_line(trained_project, pictures, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": FORMAT, "x": Payload(marker)}))  # a plain pickle, newest protocol
    result = run_stage(trained_project, "tools.predict", str(pictures[0]), "--model", str(evil))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {evil} "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not marker.exists()
