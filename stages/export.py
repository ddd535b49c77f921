"""Stage 5 — export: the trained model in forms other programs can load, each one checked.

Writes models/export/state_dict.pt (the tutorial's "method 2": weights only, loadable with
`torch.load(weights_only=True)`), models/export/model.onnx (verified against PyTorch with
onnxruntime on real test images), models/export/MODEL_CARD.md and metrics/export.json; logs the model
to the training's MLflow run as an MLflow PyTorch model with signature and input example.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from stages.lib.data import load_split
from stages.lib.engine import set_threads
from stages.lib.errors import PipelineError, run
from stages.lib.files import atomic_path, json_bytes, replaced_dir, torch_bytes, write_files
from stages.lib.modelfile import ModelFile, load_model
from stages.lib.params import flatten, load_params
from stages.lib.tracking import Tracker

MODEL_PATH, EXPORT_DIR = Path("models/model.pt"), Path("models/export")
METRICS_PATH, EVAL_PATH = Path("metrics/export.json"), Path("metrics/eval.json")
PER_CLASS_PATH = Path("metrics/per_class.csv")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    with atomic_path(path) as tmp:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        program.save(str(tmp))
        proto = onnx.load(str(tmp))
        strip_debug_info(proto)
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))


def strip_debug_info(proto) -> None:
    """Drop what the exporter records for debugging: each node's Python stack trace (absolute paths of
    this checkout and of the venv) and FX names. Left in, the same model exported from two checkouts (a
    queued experiment runs in a copy under .dvc/tmp/exps/) would differ byte for byte."""
    for graph in (proto.graph, *proto.functions):
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info, *proto.graph.initializer):
        del value.metadata_props[:]


def onnx_max_abs_diff(path: Path, model: torch.nn.Module, images: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": images.numpy()})
    with torch.inference_mode():
        expected = model(images)
    return float((torch.from_numpy(got) - expected).abs().max())


def model_card(ckpt: ModelFile, evaluation: dict, onnx_diff: float) -> str:
    c, (h, w), (ph, pw) = ckpt.input["channels"], ckpt.input["size"], ckpt.input["pad_to"]
    resize = {"center_crop": "shorter side resized, then center-cropped",
              "stretch": "the whole picture resized"}[ckpt.input["resize"]]
    dark = ""
    if ckpt.dataset in ("fashion_mnist", "mnist"):
        dark = (f"\n\n{ckpt.dataset} shows a light object on a black background: invert dark-on-light "
                "photos first (`python -m stages.predict --invert`).")
    pad = f" zero-padded to {ph}×{pw}" if (ph, pw) != (h, w) else ""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in flatten(ckpt.params).items())
    per_class = "\n".join(f"| {row['class']} | {row['accuracy']} |" for row in evaluation.get("per_class", []))
    return f"""# Model card: {ckpt.config['name']} on {ckpt.dataset}

- Classes ({len(ckpt.classes)}): {', '.join(ckpt.classes)}
- Trained for {ckpt.epoch} epochs; validation accuracy {ckpt.val_metrics['val_accuracy']:.4f}
- Test accuracy {evaluation.get('test_accuracy')} on {sum(int(row['images']) for row in evaluation.get('per_class', []))} images; test loss {evaluation.get('test_loss')}

## Input format
float32 tensor N×{c}×{ph}×{pw}: a {h}×{w} {'grayscale' if c == 1 else 'RGB'} image ({resize}){pad}, scaled
to 0..1, then normalized per channel with mean {ckpt.normalization['mean']} and std
{ckpt.normalization['std']}. Output: {len(ckpt.classes)} logits.{dark}

## Files
- `state_dict.pt`: `stages.lib.models.build_model({ckpt.config})` then
  `load_state_dict(torch.load("state_dict.pt", weights_only=True))`
- `model.onnx`: input `image`, output `logits`, dynamic batch; max |ONNX − PyTorch| on test images: {onnx_diff:.2e}.
  Metadata props hold `classes`, `mean`, `std`, `input`.
- `../model.pt`: the full checkpoint; `python -m stages.predict IMAGE...` uses it.

## Per-class test accuracy
| class | accuracy |
|---|---|
{per_class}

## Parameters
| param | value |
|---|---|
{params}
"""


def main(args) -> None:
    params = load_params()
    cfg = params.export
    set_threads(params.threads)
    model, model_file = load_model(MODEL_PATH)
    images, _ = load_split("test")
    check = model_file.normalizer()(images[: cfg.onnx_check_images]).contiguous()
    evaluation = json.loads(EVAL_PATH.read_text()) if EVAL_PATH.exists() else {}
    if PER_CLASS_PATH.exists():
        evaluation["per_class"] = list(csv.DictReader(PER_CLASS_PATH.read_text().splitlines()))
    with replaced_dir(EXPORT_DIR) as staging:  # the old export stays whole unless every file is written and checked
        write_files({staging / "state_dict.pt": torch_bytes(model_file.state_dict)})
        onnx_path = staging / "model.onnx"
        export_onnx(model, check[:1], onnx_path, {"classes": model_file.classes, "input": model_file.input,
                                                  **model_file.normalization})
        diff = onnx_max_abs_diff(onnx_path, model, check)
        if diff > cfg.onnx_atol:
            raise PipelineError(f"ONNX output differs from PyTorch by {diff:.2e} > export.onnx_atol={cfg.onnx_atol}")
        write_files({staging / "MODEL_CARD.md": model_card(model_file, evaluation, diff).encode(),
                     METRICS_PATH: json_bytes({"onnx_max_abs_diff": float(f"{diff:.3g}"), "onnx_check_images": len(check),
                                               "onnx_bytes": onnx_path.stat().st_size,
                                               "state_dict_bytes": (staging / "state_dict.pt").stat().st_size})})
    tracker = Tracker.resume(params.tracking)
    tracker.log_model(model, check[:4], model_file.classes)
    for path in (EXPORT_DIR / "MODEL_CARD.md", METRICS_PATH):
        tracker.log_artifact(path, "export")
    print(f"wrote {EXPORT_DIR}/state_dict.pt, model.onnx (max abs diff {diff:.2e} on {len(check)} images), "
          f"MODEL_CARD.md")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
