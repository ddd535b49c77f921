"""params.yaml: the single place every setting lives, read and checked before any stage does work.

`load_params()` returns the whole file as plain dicts after checking every key against SCHEMA:
unknown keys (with a "did you mean"), wrong types, out-of-range numbers and unknown names all raise
ParamsError with one line that says what is allowed.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from stages.errors import PipelineError

DATASETS = ("fashion_mnist", "mnist", "cifar10", "imagefolder")
MODELS = ("cifar10_quick", "fast_cnn", "vgg16", "resnet18")
SCHEDULES = ("constant", "onecycle")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")


class ParamsError(PipelineError):
    pass


# A check takes (dotted key, value) and returns the value, or raises ParamsError.
def _number(kind, minimum=None, above=None, below=None):
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
            hint = ""
            if isinstance(value, str):
                hint = f" (YAML read {value!r} as text; write numbers like 1.0e-3 with a dot and a signed exponent)"
            raise ParamsError(f"{key} must be {'a number' if kind is float else 'an integer'}, "
                              f"got {type(value).__name__} {value!r}{hint}")
        if above is not None and not value > above:
            raise ParamsError(f"{key} must be > {above}, got {value}")
        if minimum is not None and value < minimum:
            raise ParamsError(f"{key} must be >= {minimum}, got {value}")
        if below is not None and not value < below:
            raise ParamsError(f"{key} must be < {below}, got {value}")
        return kind(value)
    return check


def _choice(allowed):
    def check(key, value):
        if value not in allowed:
            raise ParamsError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        return value
    return check


def _device(key, value):
    if not isinstance(value, str) or not (value in DEVICES or value.startswith("cuda:")):
        raise ParamsError(f"{key} must be one of {', '.join(DEVICES)} or cuda:N; got {value!r}")
    return value


def _bool(key, value):
    if not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false, got {value!r}")
    return value


def _text(allow_empty):
    def check(key, value):
        if not isinstance(value, str) or (not allow_empty and not value):
            raise ParamsError(f"{key} must be {'a' if allow_empty else 'a non-empty'} string, got {value!r}")
        return value
    return check


def _string_list(key, value):
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ParamsError(f"{key} must be a list of folder paths or http(s) URLs, got {value!r}")
    return value


SCHEMA = {
    "seed": _number(int, minimum=0),
    "threads": _number(int, minimum=0),
    "data": {
        "dataset": _choice(DATASETS),
        "mirrors": _string_list,
        "source": _text(allow_empty=True),
        "md5": _text(allow_empty=True),
        "timeout_s": _number(float, above=0),
    },
    "preprocess": {
        "val_size": _number(int, minimum=1),
        "test_size": _number(int, minimum=0),
        "pad_to": _number(int, minimum=1),
        "image_size": _number(int, minimum=8),
        "max_train": _number(int, minimum=0),
        "max_test": _number(int, minimum=0),
    },
    "model": {
        "name": _choice(MODELS),
        "pretrained": _bool,
        "freeze_backbone": _bool,
        "tta_flip": _bool,
    },
    "train": {
        "device": _device,
        "nproc": _number(int, minimum=1),
        "epochs": _number(int, minimum=1),
        "batch_size": _number(int, minimum=1),
        "lr": _number(float, above=0),
        "momentum": _number(float, minimum=0),
        "nesterov": _bool,
        "weight_decay": _number(float, minimum=0),
        "schedule": _choice(SCHEDULES),
        "warmup": _number(float, minimum=0, below=1),
        "label_smoothing": _number(float, minimum=0, below=1),
        "ema": _number(float, minimum=0, below=1),
        "precision": _choice(PRECISIONS),
        "log_every": _number(int, minimum=1),
        "augment_crop": _number(int, minimum=0),
        "augment_flip": _bool,
    },
    "evaluate": {
        "batch_size": _number(int, minimum=1),
    },
    "export": {
        "onnx_atol": _number(float, above=0),
        "onnx_check_images": _number(int, minimum=1),
    },
    "tracking": {
        "enabled": _bool,
        "uri": _text(allow_empty=True),
        "experiment": _text(allow_empty=False),
        "timeout_s": _number(float, above=0),
    },
}


def _did_you_mean(name, options):
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(options)}"


def validate(raw, schema=SCHEMA, prefix=""):
    """Check `raw` against `schema`; return a new dict of checked values. Every key is required."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'} must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in schema:
            raise ParamsError(f"unknown key {prefix}{key}{_did_you_mean(str(key), list(schema))}")
    checked = {}
    for key, rule in schema.items():
        if key not in raw:
            raise ParamsError(f"missing key {prefix}{key}")
        if isinstance(rule, dict):
            checked[key] = validate(raw[key], rule, f"{prefix}{key}.")
        else:
            checked[key] = rule(f"{prefix}{key}", raw[key])
    return checked


def check_combinations(params: dict) -> dict:
    """Rules that involve more than one key."""
    if params["model"]["freeze_backbone"] and not params["model"]["pretrained"]:
        raise ParamsError("model.freeze_backbone: true needs model.pretrained: true (freezing random weights "
                          "leaves only the last layer to learn)")
    if params["train"]["nesterov"] and not params["train"]["momentum"]:
        raise ParamsError("train.nesterov: true needs train.momentum > 0 (Nesterov is a kind of momentum)")
    if params["data"]["dataset"] == "imagefolder" and not params["data"]["source"]:
        raise ParamsError("data.dataset imagefolder needs data.source: a folder of class folders, "
                          "a .zip/.tar.gz file, or an http(s) URL of one")
    return params


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run the stages from the project root)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return check_combinations(validate(raw))


def flatten(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.01}} -> {'train.lr': 0.01}"""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
