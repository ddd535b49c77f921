"""Self-describing model files: weights plus everything needed to rebuild and use the net.

A model file is a plain dict of tensors, numbers, strings and lists, so it always loads with
`torch.load(weights_only=True)`; a file that would need to run pickled code is refused.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from stages.errors import PipelineError
from stages.models import build_model

FORMAT = "tudui-pipeline/1"


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path} not found" if not path.exists() else f"{path} is not a file")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage makes torch.load raise almost anything (KeyError, IndexError, ...)
        reason = _reason(exc)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in reason:
            raise PipelineError(f"{path} was refused: loading it would run code ({reason})") from None
        raise PipelineError(f"{path} is not a readable PyTorch file ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise PipelineError(f"{path} is not a model file of this pipeline (expected format {FORMAT!r})")
    missing = [key for key in ("model", "state_dict") if key not in ckpt]
    if missing:
        raise PipelineError(f"{path} is damaged: it lacks {', '.join(missing)}")
    return ckpt


def _reason(exc: Exception) -> str:
    """The informative line of an error; torch's weights_only errors wrap it in paragraphs of advice."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)] or lines
    return f"{exc.__class__.__name__}: {useful[0][:200]}" if useful else exc.__class__.__name__


def load_model(path, device="cpu"):
    """Rebuild the net a model file describes and load its weights; returns (model, checkpoint)."""
    ckpt = load_checkpoint(path, map_location=device)
    model = build_model(ckpt["model"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise PipelineError(f"{path}: weights do not fit {ckpt['model']} "
                            f"({' '.join(str(exc).split())[:300]})") from None
    return model.to(device).eval(), ckpt
