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
from typing import Callable

import torch

from stages.lib.errors import PipelineError, one_line
from stages.lib.files import torch_bytes
from stages.lib.loader import make_normalizer
from stages.lib.models import build_model

FORMAT = "tudui-pipeline/1"


def read_torch_file(path: str | Path, map_location="cpu") -> dict:
    """A dict of this pipeline's format from a .pt file, loaded without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found" if not path.exists() else f"{path} is not a file")
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
    config: dict          # the architecture: build_model(config) rebuilds the net (stages.lib.models)
    epoch: int            # epochs trained
    state_dict: dict      # the weights (the weight average when train.ema is on)
    classes: list[str]    # output i is classes[i]
    normalization: dict   # {"mean": [...], "std": [...]} per channel, on the 0..1 scale
    input: dict           # {"channels", "size": the data set's H×W, "pad_to": the net's H×W, "resize"}
    params: dict = field(default_factory=dict)       # params.yaml as trained
    dataset: str = ""
    val_metrics: dict = field(default_factory=dict)  # the last epoch's validation row

    def to_bytes(self) -> bytes:
        content = {f.name: getattr(self, f.name) for f in fields(self)}
        return torch_bytes({"format": FORMAT, "model": content.pop("config"), **content})

    @classmethod
    def load(cls, path: str | Path = "models/model.pt", map_location="cpu") -> "ModelFile":
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

    def normalizer(self, device: torch.device | str = "cpu") -> Callable:
        """uint8 N×C×H'×W' at the net's size -> the normalized float input (see stages.lib.loader)."""
        return make_normalizer(self.normalization["mean"], self.normalization["std"], device)

    def read_images(self, paths: list[Path], invert: bool = False) -> torch.Tensor:
        """Image files (any format and mode Pillow reads) -> uint8 N×C×H×W as the data set stores its
        images: converted to its channels and fitted to its size the way preprocess fitted them
        (imagefile.decode_image, the code the served model runs too)."""
        from stages.lib.images import load_image

        spec = self.input
        return torch.stack([load_image(p, spec["channels"], spec["size"], invert, spec["resize"]) for p in paths])

    def preprocessor(self) -> torch.nn.Module:
        """uint8 N×C×H×W at the data set's size -> the net's input (preprocessing.Preprocess): zero-padded
        like the training data, scaled and normalized; the same module runs inside model.onnx."""
        from stages.lib.preprocessing import Preprocess

        return Preprocess(self.input["size"], self.input["pad_to"], self.normalization["mean"],
                          self.normalization["std"])

    def prepare(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 images at the data set's size -> the net's input (see `preprocessor`)."""
        return self.preprocessor().to(device)(images.to(device))

    def raw_net(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (the built net) on uint8 images at the data set's size -> (logits, probabilities), in
        eval mode: what export writes to model.onnx."""
        from stages.lib.preprocessing import RawImageNet

        return RawImageNet(self.preprocessor().to(next(model.parameters()).device), model).eval()


def load_model(path: str | Path = "models/model.pt", device: torch.device | str = "cpu"):
    """(the trained net in eval mode on `device`, its ModelFile); every error names the file."""
    model_file = ModelFile.load(path, device)
    try:
        return model_file.build(device), model_file
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
