"""params.yaml: the single place every setting lives, typed, read and checked before any stage does work.

`load_params()` reads the file as YAML 1.2, exactly as DVC reads it (`lr: 1e-3` is a float), and returns
a `Params` object (`params.train.lr`). Every key is required; an unknown key (with a "did you mean"), a
wrong type, an out-of-range number or an unknown name raises ParamsError with one line that says what
is allowed. The data set and model names are checked against their registries (stages/lib/datasets.py,
stages/lib/nets.py) by the stages that use them, which pass the registry in (`choices`): importing the
registries here would make every stage depend on every data set's download code and every net.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from stages.lib.errors import PipelineError, one_line


class ParamsError(PipelineError):
    pass


# Upper bounds: no value may overflow or make a stage allocate absurd memory before it starts.
BIG = 10**9              # counts of images or steps
MAX_SIDE = 4096          # image sides in pixels (a 4096×4096 RGB image is 48 MB; a split of them would not fit)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _one_of(key: str, value: str, info: ValidationInfo) -> str:
    """`value` when it is a name of the registry the caller passed for `key` (or none was passed)."""
    allowed = (info.context or {}).get(key)
    if allowed is not None and value not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


class Data(Section):
    dataset: str
    mirrors: list[Annotated[str, Field(min_length=1)]]
    source: str
    md5: str
    timeout_s: float = Field(gt=0, le=3600)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, name: str, info: ValidationInfo) -> str:
        return _one_of("data.dataset", name, info)


class Preprocess(Section):
    val_size: int = Field(ge=1, le=BIG)
    test_size: int = Field(ge=0, le=BIG)
    pad_to: int = Field(ge=1, le=MAX_SIDE)
    image_size: int = Field(ge=8, le=MAX_SIDE)
    max_train: int = Field(ge=0, le=BIG)
    max_test: int = Field(ge=0, le=BIG)
    split_seed: int = Field(ge=0, le=2**32 - 1)


class Model(Section):
    name: str
    pretrained: bool
    freeze_backbone: bool
    tta_flip: bool
    tta_translate: bool
    whiten: bool

    @field_validator("name")
    @classmethod
    def _name(cls, name: str, info: ValidationInfo) -> str:
        return _one_of("model.name", name, info)


class Train(Section):
    device: str = Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    nproc: int = Field(ge=1, le=1024)
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(ge=1, le=1 << 20)
    lr: float = Field(gt=0, le=1000)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0, le=1000)
    schedule: Literal["constant", "onecycle"]
    warmup: float = Field(ge=0, lt=1)
    label_smoothing: float = Field(ge=0, lt=1)
    ema: float = Field(ge=0, lt=1)
    precision: Literal["auto", "bf16", "fp32"]
    log_every: int = Field(ge=1, le=BIG)
    augment_crop: int = Field(ge=0, le=MAX_SIDE)
    augment_flip: bool
    train_on_val: bool
    keep: Literal["best", "last"]
    patience: int = Field(ge=0, le=100_000)
    val_every: int = Field(ge=0, le=100_000)

    @model_validator(mode="after")
    def _keep_best_needs_unseen_validation_every_epoch(self):
        if self.keep == "best" and self.train_on_val:
            raise ValueError("train.keep: best picks the epoch by validation accuracy, but train.train_on_val trains "
                             "on the validation images; set train.keep: last")
        if self.val_every != 1 and (self.keep == "best" or self.patience):
            raise ValueError(f"train.val_every: {self.val_every} validates only some epochs, but train.keep: best and "
                             "train.patience compare every epoch's validation; set train.val_every: 1, or train.keep: "
                             "last and train.patience: 0")
        return self


class Evaluate(Section):
    batch_size: int = Field(ge=1, le=1 << 20)
    precision: Literal["auto", "bf16", "fp32"]


class Export(Section):
    onnx_atol: float = Field(gt=0, le=1000)
    onnx_check_images: int = Field(ge=1, le=BIG)


class Tracking(Section):
    enabled: bool
    uri: str = Field(pattern=r"^[^@]*$")  # no user:password@host: it would be logged with the params
    experiment: str = Field(min_length=1)
    timeout_s: float = Field(gt=0, le=3600)
    registered_model: str

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):  # it goes into models:/<name>/<version> URIs
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}")
        return name


class Serve(Section):
    max_images: int = Field(ge=1, le=10_000_000)
    max_body_mb: float = Field(gt=0, le=65536)
    chunk: int = Field(ge=1, le=1 << 20)
    timeout_s: float = Field(gt=0, le=86400)
    shutdown_s: float = Field(ge=0, le=3600)
    latency_p99_ms: float = Field(gt=0, le=600_000)


class Params(Section):
    seed: int = Field(ge=0, le=2**32 - 1)  # what numpy and every torch generator accept
    threads: int = Field(ge=0, le=1024)
    data: Data
    preprocess: Preprocess
    model: Model
    train: Train
    evaluate: Evaluate
    export: Export
    tracking: Tracking
    serve: Serve

    @model_validator(mode="after")
    def _combinations(self):
        """Rules that involve more than one key."""
        if self.model.freeze_backbone and not self.model.pretrained:
            raise ValueError("model.freeze_backbone: true needs model.pretrained: true (freezing random weights "
                             "leaves only the last layer to learn)")
        if self.train.nesterov and not self.train.momentum:
            raise ValueError("train.nesterov: true needs train.momentum > 0 (Nesterov is a kind of momentum)")
        if self.data.dataset == "imagefolder" and not self.data.source:
            raise ValueError("data.dataset imagefolder needs data.source: a folder of class folders, "
                             "a .zip/.tar.gz file, or an http(s) URL of one")
        return self

    def flat(self) -> dict:
        """{'train.lr': 0.01, ...}: every value under its dotted key."""
        return flatten(self.model_dump())


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed at `loc` in params.yaml."""
    model = Params
    for key in loc:
        model = model.model_fields[key].annotation
    return list(model.model_fields)


# pydantic error type -> this project's words; {key}, {got} (type and value) and the error's context fill them in
MESSAGES = {
    "missing": "missing key {key}",
    "model_type": "{key} must be a mapping, got {type}",
    "greater_than": "{key} must be > {gt}, got {value}",
    "greater_than_equal": "{key} must be >= {ge}, got {value}",
    "less_than": "{key} must be < {lt}, got {value}",
    "less_than_equal": "{key} must be <= {le}, got {value}",
    "finite_number": "{key} must be a finite number, got {value}",
    "int_type": "{key} must be an integer, {got}",
    "float_type": "{key} must be a number, {got}",
    "bool_type": "{key} must be true or false, {got}",
    "string_type": "{key} must be a string, {got}",
    "string_too_short": "{key} must be a non-empty string",
    "list_type": "{key} must be a list of folder paths or http(s) URLs, {got}",
}
PATTERN_MESSAGES = {  # the fields with a pattern
    "train.device": "{key} must be one of auto, cpu, cuda or cuda:N; got {value!r}",
    "tracking.uri": "{key} must not hold credentials (user:password@host): they would be logged with the params; "
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead",
}


def _message(error: dict) -> str:
    """One pydantic error as one line in this project's words."""
    loc = tuple(str(part) for part in error["loc"])
    key, kind, value = ".".join(loc), error["type"], error.get("input")
    ctx = {name: f"{v:g}" if isinstance(v, float) else v for name, v in (error.get("ctx") or {}).items()}
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        return f"unknown key {key}" + (f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}")
    if kind == "literal_error":
        allowed = ", ".join(part.strip("'") for part in ctx["expected"].replace(" or ", ", ").split(", "))
        return f"{key} must be one of {allowed}; got {value!r}"
    if kind == "value_error":  # the validators' and combination rules' own messages
        return f"{key} {ctx['error']}" if key else str(ctx["error"])
    hint = ""
    if kind == "float_type" and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", value):
        hint = " (a quoted number is text in YAML: remove the quotes)"
    template = PATTERN_MESSAGES.get(key) if kind == "string_pattern_mismatch" else MESSAGES.get(kind)
    template = template or "{key}: " + error["msg"] + ", {got}"
    return template.format(key=key or "params", type=type(value).__name__, value=value,
                           got=f"got {type(value).__name__} {value!r}", **ctx) + hint


def validate(raw, choices: dict | None = None) -> Params:
    """Check a mapping read from params.yaml; ParamsError (one line) on the first problem. `choices`:
    {"data.dataset": the data set registry, "model.name": the net registry}, whichever the caller uses."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context=choices or {})
    except ValidationError as exc:
        errors = exc.errors()
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # "did you mean" first
        raise ParamsError(_message(first)) from None


def read_yaml(path: str | os.PathLike):
    """A YAML file as DVC reads it: YAML 1.2 (1e-3 is a number, yes/no are text)."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    try:
        return YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path} not found (run the stages from the project root)") from None
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {one_line(exc)}") from None


def load_params(path: str | os.PathLike = "params.yaml", choices: dict | None = None) -> Params:
    return validate(read_yaml(path), choices)


def flatten(params: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.01}} -> {'train.lr': 0.01}"""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
