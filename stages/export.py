"""Stage 5 — export: the trained model in forms other programs can load, each one checked.

Writes models/export/state_dict.pt (the tutorial's "method 2": weights only, loadable with
`torch.load(weights_only=True)`), models/export/model.onnx (images as the data set stores them in,
uint8 N×C×H×W at its native size; padding, normalization and flip TTA inside the graph; `logits` and
`probabilities` out; checked with onnxruntime against PyTorch on real test images), models/export/
MODEL_CARD.md and metrics/export.json. Then, when tracking is on, logs the served model (a pyfunc over
image files running model.onnx, stages/lib/tracking/pyfunc.py) to the training's MLflow run, with the card and
export.json; it registers nothing: `make promote` makes a run's model a registered version, the champion.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from stages.lib.prepared import load_split
from stages.lib.device import set_threads
from stages.lib.errors import PipelineError, run
from stages.lib.files import atomic_path, json_bytes, replaced_dir, torch_bytes, write_files
from stages.lib.modelfile import ModelFile, load_model
from stages.lib.params import flatten, load_params
from stages.lib.paths import EVAL_METRICS, EXPORT_DIR, EXPORT_REPORT, MODEL, PER_CLASS
from stages.lib.provenance import Inputs
from stages.lib.tracking.runs import Tracker
from stages.lib.transforms import unpad


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    with atomic_path(path) as tmp:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["image"],
                                    output_names=["logits", "probabilities"], dynamic_shapes=({0: batch},),
                                    verbose=False)
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


def onnx_max_abs_diff(path: Path, images: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Max |ONNX − PyTorch| of the logits and of the probabilities, ONNX Runtime given the raw uint8
    `images` and PyTorch's `logits` computed in float32 from the prepared tensors (evaluate at its default precision)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_logits, got_probabilities = session.run(["logits", "probabilities"], {"image": images.numpy()})
    return (float((torch.from_numpy(got_logits) - logits).abs().max()),
            float((torch.from_numpy(got_probabilities) - logits.softmax(1)).abs().max()))


def usage_section(ckpt: ModelFile, invert: str) -> str:
    """The card's "Serving it" and "Files" sections."""
    c, (ph, pw) = ckpt.input["channels"], ckpt.input["pad_to"]
    return f"""## Serving it
Each export with tracking on logs an MLflow model (a pyfunc over image files running `model.onnx`) to the
training's MLflow run. `make promote EXP=<experiment>` checks it against the champion and makes it a version
of `tracking.registered_model` with the alias `champion`; `make serve` serves `@champion` on
http://127.0.0.1:5002 (`SERVE_PORT`; `MODEL_URI` picks another model).
Call it with base64-encoded image files, any format and size, in a column `image`:

```bash
curl -s http://127.0.0.1:5002/invocations -H 'Content-Type: application/json' \\
  -d '{{"dataframe_split": {{"columns": ["image"], "data": [["'"$(base64 -w0 IMAGE.png)"'"]]}}, "params": {{"top_k": 3{invert}}}}}'
```

Answer, one row per image: `{{"predictions": [{{"class": ..., "probability": ..., "top": [{{"class": ..., "probability": ...}}, ...]}}]}}`.
A bad image (not base64, not an image, too large to decode safely) or an empty list gets HTTP 400 with a
one-line `message`.

## Files
- `model.onnx`: the model above; metadata props hold `classes`, `mean`, `std`, `input`.
- `state_dict.pt`: `stages.lib.nets.build_model({ckpt.config})` then
  `load_state_dict(torch.load("state_dict.pt", weights_only=True))`; that net takes the normalized,
  padded float32 N×{c}×{ph}×{pw} input.
- `../model.pt`: the full checkpoint; `python -m tools.predict IMAGE...` uses it.
"""


def model_card(ckpt: ModelFile, evaluation: dict, diffs: tuple[float, float]) -> str:
    c, (h, w), (ph, pw) = ckpt.input["channels"], ckpt.input["size"], ckpt.input["pad_to"]
    resize = {"center_crop": "shorter side resized, then center-cropped",
              "stretch": "the whole picture resized"}[ckpt.input["resize"]]
    kind = "grayscale" if c == 1 else "RGB"
    dark, invert = "", ""
    if c == 1 and ckpt.normalization["mean"][0] < 0.5:  # mostly dark gray images: light objects on black
        dark = (f"\n\n{ckpt.dataset} shows a light object on a black background: invert dark-on-light "
                "photos first (`python -m tools.predict --invert`; the served model's param `invert`).")
        invert = ', "invert": false'
    pad = f", zero-pads it to {ph}×{pw}" if (ph, pw) != (h, w) else ""
    views = [name for name, on in (("its mirror's", ckpt.config.get("tta_flip")),
                                    ("those of the image shifted a pixel down-right and up-left",
                                     ckpt.config.get("tta_translate"))) if on]
    tta = f" and averages each image's logits with {' and '.join(views)} (test-time augmentation)" if views else ""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in flatten(ckpt.params).items())
    per_class = "\n".join(f"| {row['class']} | {row['accuracy']} |" for row in evaluation.get("per_class", []))
    tested = sum(int(row['images']) for row in evaluation.get('per_class', []))
    test = ", ".join(f"{key} {value}" for key, value in evaluation.items() if key != "per_class") or "not evaluated"
    return f"""# Model card: {ckpt.config['name']} on {ckpt.dataset}

- Classes ({len(ckpt.classes)}): {', '.join(ckpt.classes)}
- Trained for {ckpt.epoch} epochs; validation accuracy {ckpt.val_metrics['val_accuracy']:.4f}
- On {tested} test images: {test}

## Input: images as the data set stores them
`model.onnx` takes `image`: uint8 N×{c}×{h}×{w} ({kind}, pixel values 0..255, any batch size N). Any
image file becomes that with `python -m tools.predict`'s decoding (stages/lib/images.py: converted to
{kind} with transparency on black, {resize} to {h}×{w}). The graph itself{pad}, scales to 0..1 and normalizes
per channel with mean {ckpt.normalization['mean']} and std {ckpt.normalization['std']}{tta}.{dark}

## Outputs
- `logits`: float32 N×{len(ckpt.classes)}
- `probabilities`: float32 N×{len(ckpt.classes)}, their softmax; column i is class i of the metadata prop `classes`

Max |ONNX − PyTorch| on test images, ONNX Runtime given the raw pixels and PyTorch the prepared tensors as
evaluate reads them, both in float32: {diffs[0]:.2e} (logits), {diffs[1]:.2e} (probabilities).

{usage_section(ckpt, invert)}
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
    inputs = Inputs.read("export")
    params = load_params()
    export = params.export
    set_threads(params.threads)
    model, model_file = load_model(MODEL)
    prepared, _ = load_split("test")
    prepared = prepared[: export.onnx_check_images]
    raw = unpad(prepared, model_file.input["size"])  # the data set's own pixels, as model.onnx takes them
    with torch.inference_mode():
        logits = model(model_file.preprocess(padded=True)(prepared))  # float32, from the prepared tensors
    evaluation = json.loads(EVAL_METRICS.read_text()) if EVAL_METRICS.exists() else {}
    if PER_CLASS.exists():
        evaluation["per_class"] = list(csv.DictReader(PER_CLASS.read_text().splitlines()))
    with replaced_dir(EXPORT_DIR) as staging:  # the old export stays whole unless every file is written and checked
        write_files({staging / "state_dict.pt": torch_bytes(model_file.state_dict)})
        onnx_path = staging / "model.onnx"
        export_onnx(model_file.raw_net(model), raw[:1].repeat(2, 1, 1, 1), onnx_path,  # batch 1 would be fixed
                    {"classes": model_file.classes, "input": model_file.input, **model_file.normalization})
        diffs = onnx_max_abs_diff(onnx_path, raw, logits)
        if max(diffs) > export.onnx_atol:
            raise PipelineError(f"ONNX output differs from PyTorch by {max(diffs):.2e} > export.onnx_atol={export.onnx_atol}")
        inputs.verify()
        write_files({staging / "MODEL_CARD.md": model_card(model_file, evaluation, diffs).encode(),
                     EXPORT_REPORT: json_bytes({"onnx_max_abs_diff": float(f"{diffs[0]:.3g}"),
                                               "onnx_probabilities_max_abs_diff": float(f"{diffs[1]:.3g}"),
                                               "onnx_check_images": len(raw),
                                               "onnx_bytes": onnx_path.stat().st_size,
                                               "state_dict_bytes": (staging / "state_dict.pt").stat().st_size})})
    print(f"wrote {EXPORT_DIR}/state_dict.pt, model.onnx (uint8 {list(raw.shape[1:])} in; max abs diff "
          f"{diffs[0]:.2e} on {len(raw)} test images), MODEL_CARD.md", flush=True)
    tracker = Tracker.resume(params.tracking)
    tracker.log_model(EXPORT_DIR / "model.onnx", model_file, raw[0])
    for path in (EXPORT_DIR / "MODEL_CARD.md", EXPORT_REPORT):
        tracker.log_artifact(path, "export")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
