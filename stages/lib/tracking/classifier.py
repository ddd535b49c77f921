"""The served MLflow model's code: image files in, class names out. Export logs it as an MLflow "model
from code" (stages/lib/tracking/pyfunc.py), with stages/lib/images.py copied beside it and the raw-image model.onnx as
its artifact. It imports nothing from this repository: the model loads wherever mlflow, onnxruntime (or
torch, for a .pt2 program), numpy, pandas and Pillow are installed. Not imported by the pipeline itself.

Input: a DataFrame with one string column `image`, each a base64-encoded image file (PNG, JPEG, ... any
size and mode). Params: `top_k` (default 3) and `invert` (for dark-on-light photos of light-on-dark data
sets such as Fashion-MNIST). Output, one row per image: `class`, `probability` and `top`, the top_k
classes with their probabilities, as `python -m tools.predict --json` gives them.

Model config (MLmodel; `SERVING_MODEL_CONFIG='{"threads": 2}'` overrides it when served): `classes`,
`input` (channels, size, resize: how to decode), `threads` (CPU threads per request, default 1: a steady
tail latency with several clients; `benchmarks/serve_bench.py --threads 1,2` compares them).

A bad request (not base64, not an image, a decompression bomb, no images) fails as a whole with one line
that names the image's row; served, that is an HTTP 400.
"""
import base64
import binascii
import io

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from images import ImageError, decode_image  # stages/lib/images.py, copied beside this file into the model (its code/ folder)


class BadRequest(MlflowException):
    """A request the model cannot answer: HTTP 400, and the reason is the whole message. (MLflow's
    scoring server rewrites a failed prediction's message as "Failed to predict data '<the whole input
    DataFrame>'. \\nError: ...": several lines of base64 for one reason. The message stays the reason.)"""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.reason

    @message.setter
    def message(self, value: str) -> None:
        pass


def decode_base64(text) -> bytes:
    if not isinstance(text, str):
        raise ImageError(f"expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # line-wrapped base64 (the `base64` command wraps at 76 columns)
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"not base64 ({exc})") from None


class ImageClassifier(PythonModel):
    def load_context(self, context):
        config = context.model_config
        self.classes, spec = config["classes"], config["input"]
        self.channels, self.size, self.resize = spec["channels"], spec["size"], spec["resize"]
        threads = int(config.get("threads", 1))  # per request; uvicorn, the decoding and the next request get the rest
        path = context.artifacts["model"]
        if path.endswith(".onnx"):
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # no warnings on stderr for every session
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.run = lambda images: session.run(["probabilities"], {"image": images})[0]
        else:  # a torch.export program (.pt2) of the same raw-image model
            import torch

            torch.set_num_threads(threads)
            module = torch.export.load(path).module()

            def run(images):
                with torch.inference_mode():
                    return module(torch.from_numpy(images))[1].numpy()

            self.run = run

    def images(self, column, invert: bool) -> np.ndarray:
        pixels = []
        for row, text in enumerate(column):
            try:
                pixels.append(decode_image(io.BytesIO(decode_base64(text)), self.channels, self.size, invert,
                                           self.resize))
            except ImageError as exc:
                raise BadRequest(f"image {row}: {exc}") from None
        return np.stack(pixels)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        top_k = int(params.get("top_k", 3))
        if top_k < 1:
            raise BadRequest(f"top_k must be at least 1, got {top_k}")
        if len(model_input) == 0:
            raise BadRequest("no images: the request holds an empty list")
        if "image" not in model_input.columns:
            raise BadRequest("expected a column `image` of base64-encoded image files, got "
                             f"{', '.join(map(str, model_input.columns))}")
        probabilities = self.run(self.images(model_input["image"], bool(params.get("invert", False))))
        k = min(top_k, len(self.classes))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        rows = []
        for probs, best in zip(probabilities, order):
            top = [{"class": self.classes[i], "probability": round(float(probs[i]), 4)} for i in best]
            rows.append({"class": top[0]["class"], "probability": top[0]["probability"], "top": top})
        return pd.DataFrame(rows, columns=["class", "probability", "top"])


set_model(ImageClassifier())
