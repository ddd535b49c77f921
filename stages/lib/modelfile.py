"""The model file, models/model.pt: written by train; read by evaluate, export, predict and the served
model. It explains itself: format version, architecture config, weights, class names, the input the net
was trained on and its normalization, the params and the final validation metrics.

It is a plain dict of tensors, numbers, strings and lists, so it always loads with
`torch.load(weights_only=True)`; a file that would need to run pickled code is refused. The same safe
reading serves train's resume checkpoint (models/checkpoint.pt), which has the same format tag.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from stages.lib import faults
from stages.lib.errors import PipelineError, one_line
from stages.lib.files import atomic_path, torch_bytes
from stages.lib.nets import build_model
from stages.lib.paths import CHECKPOINT, MODEL
from stages.lib.transforms import Preprocess, RawImageNet

FORMAT = "tudui-pipeline/1"


def read_torch_file(path: str | Path, map_location="cpu") -> dict:
    """A dict of this pipeline's format from a .pt file, loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found: make it with `make run` (dvc repro), or fetch it with `dvc pull`"
                            if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage makes torch.load raise almost anything (KeyError, IndexError, ...)
        reason = _reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise PipelineError(f"{path} was refused: loading it would run code ({reason})") from None
        raise PipelineError(f"{path} is not a readable PyTorch file ({reason})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise PipelineError(f"{path} is not a model file of this pipeline (expected format {FORMAT!r})")
    missing = [key for key in ("model", "state_dict") if key not in content]
    if missing:
        raise PipelineError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return content


def _reason(exc: Exception) -> str:
    """The informative line of an error; torch's weights_only errors wrap it in paragraphs of advice."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)] or lines
    return f"{exc.__class__.__name__}: {useful[0][:200]}" if useful else exc.__class__.__name__


@dataclass(frozen=True)
class ModelFile:
    config: dict          # the architecture: build_model(config) rebuilds the net (stages.lib.nets)
    epoch: int            # epochs trained
    state_dict: dict      # the weights (the weight average when train.ema is on)
    classes: list[str]    # output i is classes[i]
    normalization: dict   # {"mean": [...], "std": [...]} per channel, on the 0..1 scale
    input: dict           # {"channels", "size": the data set's H×W, "pad_to": the net's H×W, "resize"}
    params: dict = field(default_factory=dict)       # params.yaml as trained
    dataset: str = ""
    val_metrics: dict = field(default_factory=dict)  # the kept epoch's validation row (train.keep)

    def to_bytes(self) -> bytes:
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        return torch_bytes({"format": FORMAT, "model": content.pop("config"), **content})

    @classmethod
    def load(cls, path: str | Path = MODEL, map_location="cpu") -> "ModelFile":
        content = read_torch_file(path, map_location)
        missing = [key for key in ("classes", "input", "normalization", "epoch") if key not in content]
        if missing:
            raise PipelineError(f"{path} lacks {', '.join(missing)}: use the finished model "
                                "(models/model.pt), not a training checkpoint")
        content["config"] = content["model"]
        content["input"] = {"resize": "stretch", **content["input"]}  # files from before image folders lack it
        return cls(**{f.name: content[f.name] for f in fields(cls) if f.name in content})

    def build(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The trained net, in eval mode, on `device`."""
        model = build_model(self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise PipelineError(f"weights do not fit {self.config} ({one_line(exc)})") from None
        return model.to(device).eval()

    def preprocess(self, padded: bool = False) -> Preprocess:
        """uint8 N×C×H×W images at the data set's size (or, `padded`, as preprocess stored them) -> the
        net's input: transforms.Preprocess with this model's input spec and normalization."""
        return Preprocess.of(self.input, self.normalization, padded)

    def raw_net(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (the built net) on uint8 images at the data set's size -> (logits, probabilities), in
        eval mode: what export writes to model.onnx."""
        return RawImageNet(self.preprocess().to(next(model.parameters()).device), model).eval()


def load_model(path: str | Path = MODEL, device: torch.device | str = "cpu"):
    """(the trained net in eval mode on `device`, its ModelFile); every error names the file."""
    model_file = ModelFile.load(path, device)
    try:
        return model_file.build(device), model_file
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def save_checkpoint(ckpt: dict, path: Path = CHECKPOINT) -> None:
    """Train's resume state: training.fit's checkpoint (the model file's format, plus optimizer and RNG
    states), with the run's fingerprint and MLflow run id."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(torch_bytes(ckpt))
        faults.at("checkpoint", ckpt["epoch"])


def load_checkpoint(path: Path, fingerprint: str, epochs: int, say=print) -> dict | None:
    """The checkpoint to resume from: None (with the reason said) when there is none, it is unreadable,
    it was made with other settings or data (`fingerprint`), it already has `epochs` epochs, or it stopped
    early (train.patience)."""
    if not path.exists():
        return None
    try:
        ckpt = read_torch_file(path)
    except PipelineError as exc:
        say(f"{exc}: starting over")
        return None
    if ckpt.get("fingerprint") != fingerprint:
        say(f"{path} was trained with other settings or data: starting over")
        return None
    if ckpt["epoch"] >= epochs or ckpt.get("stopped"):
        done = "stopped early after epoch" if ckpt.get("stopped") else "already has"
        say(f"{path} {done} {ckpt['epoch']} epochs (asked for {epochs}): starting over")
        return None
    say(f"resuming from {path} after epoch {ckpt['epoch']}")
    return ckpt
