"""The served model, described for MLflow: a pyfunc over image files (classifier.py, with stages/lib/images.py
beside it) that runs the raw-image model.onnx, with its signature, params, input example and pip
requirements. The tracker logs and registers it after export (runs.py); the serving benchmark saves
it to folders, once with model.onnx (ONNX Runtime) and once with a torch.export program (PyTorch).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import torch

CODE = Path(__file__).with_name("classifier.py")
IMAGE_CODE = Path(__file__).parents[1] / "images.py"  # the decoding predict uses, shipped with the model
TOP_K = 3
CHUNK = 256  # images decoded and run at a time inside the model (model config `chunk`; serve.chunk overrides it)


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 C×H×W -> a PNG file's bytes (deterministic: Pillow writes no time stamp)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array, "L" if array.shape[2] == 1 else "RGB").save(
        buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    top = Array(Object([Property("class", "string"), Property("probability", "double")]))
    return ModelSignature(
        # `image` is required by the model itself: marked optional here so that a request without it (such as
        # {"dataframe_records": []}) reaches the model and gets its one-line reason, not MLflow's schema dump.
        inputs=Schema([ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string", "class"), ColSpec("double", "probability"), ColSpec(top, "top")]),
        params=ParamSchema([ParamSpec("top_k", "long", TOP_K), ParamSpec("invert", "boolean", False)]))


def requirements(model_path: Path) -> list[str]:
    """What the model needs at load time: pinned to this venv's versions (nothing from this repository)."""
    from importlib.metadata import version

    runtime = "onnxruntime" if model_path.suffix == ".onnx" else "torch"
    return [f"{name}=={version(name)}" for name in ("mlflow", runtime, "numpy", "pandas", "pillow")]


def model_spec(model_path: Path, classes: list[str], input_spec: dict, example: bytes) -> dict:
    """Arguments of mlflow.pyfunc.log_model / save_model for the model file `model_path` (model.onnx,
    or a .pt2 torch.export program of the same raw-image net); `example`: a real image file's bytes."""
    import importlib.util
    import sys

    import pandas as pd

    # MLflow runs the code file while logging it, before the model's code/ folder is on sys.path: give its
    # `import images` the file the model carries (code_paths), loaded as the served model will load it.
    if "images" not in sys.modules:
        spec = importlib.util.spec_from_file_location("images", IMAGE_CODE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["images"] = module
    return {"python_model": str(CODE), "code_paths": [str(IMAGE_CODE)], "artifacts": {"model": str(model_path)},
            "model_config": {"classes": list(classes), "input": dict(input_spec), "request_threads": 1,
                             "chunk": CHUNK},
            "signature": signature(), "input_example": (pd.DataFrame({"image": [b64(example)]}), {"top_k": TOP_K}),
            "pip_requirements": requirements(model_path)}


def save_program(raw_net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The raw-image net as a torch.export program (.pt2) with a dynamic batch axis (`example`: 2 or more
    images; with one, torch.export fixes the batch size at 1): the PyTorch
    variant of model.onnx, loadable with torch.export.load and no code from this repository."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(raw_net, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
