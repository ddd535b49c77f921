"""The served MLflow model's code: image files in, class names out. Export logs it as an MLflow "model
from code" (stages/lib/tracking/pyfunc.py), with stages/lib/images.py copied beside it and the raw-image model.onnx as
its artifact. It imports nothing from this repository: the model loads wherever mlflow, onnxruntime (or
torch, for a .pt2 program), numpy, pandas and Pillow are installed. Not imported by the pipeline itself.

Input: a DataFrame with one string column `image`, each a base64-encoded image file (PNG, JPEG, ... any
size and mode). Params: `top_k` (default 3) and `invert` (for dark-on-light photos of light-on-dark data
sets such as Fashion-MNIST). Output, one row per image: `class`, `probability` and `top`, the top_k
classes with their probabilities, as `python -m tools.predict --json` gives them.

Model config (MLmodel; `SERVING_MODEL_CONFIG='{"request_threads": 2}'` overrides it when served): `classes`,
`input` (channels, size, resize: how to decode), `request_threads` (CPU threads per request, default 1: a steady
tail latency with several clients; `benchmarks/serve_bench.py --threads 1,2` compares them), `chunk`
(images decoded and run at a time, default 256: a request of any length needs the memory of one chunk;
tools/serve.py sets it from serve.chunk). ONNX Runtime runs without its CPU memory arena, which would
otherwise keep the largest batch's memory for the life of the process.

A bad request (not base64, not an image, a decompression bomb, no images, no `image` column, a top_k that
is not a whole number >= 1, an invert that is not true or false) fails as a whole with one line that
names the image's row; served, that is an HTTP 400. `interrupted`, a callable the server may replace, is asked before each image: when it says
yes (the client left, the request timed out, the server is stopping) predict stops there.
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


def top_k_of(params: dict) -> int:
    top_k = params.get("top_k", 3)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise BadRequest(f"top_k must be a whole number >= 1, got {top_k!r}")
    return int(top_k)


class ImageClassifier(PythonModel):
    CHUNK = 256  # images at a time when the model config names none (versions registered before it did)

    def __init__(self):
        self.interrupted = lambda: False  # tools/serve.py replaces it: stop a request nobody waits for

    def load_context(self, context):
        config = context.model_config
        self.classes, spec = config["classes"], config["input"]
        self.channels, self.size, self.resize = spec["channels"], spec["size"], spec["resize"]
        threads = int(config.get("request_threads", config.get("threads", 1)))  # per request; uvicorn, the decoding and the next request get the rest
        self.chunk = int(config.get("chunk", self.CHUNK))
        if self.chunk < 1:
            raise ValueError(f"model config chunk must be >= 1, got {self.chunk}")
        path = context.artifacts["model"]
        if path.endswith(".onnx"):
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # no warnings on stderr for every session
            options.intra_op_num_threads = threads
            options.enable_cpu_mem_arena = False  # the arena would keep the largest chunk's memory for good
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

    def images(self, column, invert: bool, first_row: int = 0) -> np.ndarray:
        pixels = []
        for row, text in enumerate(column, start=first_row):
            if self.interrupted():
                raise BadRequest(f"stopped at image {row}: the request was abandoned")
            try:
                pixels.append(decode_image(io.BytesIO(decode_base64(text)), self.channels, self.size, invert,
                                           self.resize))
            except ImageError as exc:
                raise BadRequest(f"image {row}: {exc}") from None
        return np.stack(pixels)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = params or {}
        k = min(top_k_of(params), len(self.classes))
        invert = params.get("invert", False)
        if not isinstance(invert, (bool, np.bool_)):
            raise BadRequest(f"invert must be true or false, got {invert!r}")
        if len(model_input.columns) and "image" not in model_input.columns:
            raise BadRequest("expected a column `image` of base64-encoded image files, got "
                             f"{', '.join(map(str, model_input.columns))}")
        if len(model_input) == 0:
            raise BadRequest("no images: the request holds an empty list")
        column, rows = model_input["image"], []
        for start in range(0, len(column), self.chunk):  # one chunk's pixels and activations at a time
            probabilities = self.run(self.images(column.iloc[start:start + self.chunk], bool(invert), start))
            order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
            for probs, best in zip(probabilities, order):
                top = [{"class": self.classes[i], "probability": round(float(probs[i]), 4)} for i in best]
                rows.append({"class": top[0]["class"], "probability": top[0]["probability"], "top": top})
        return pd.DataFrame(rows, columns=["class", "probability", "top"])


set_model(ImageClassifier())
