"""serve — the classifier over HTTP: the champion, models:/tudui-classifier@champion (`make serve`).

    python -m tools.serve [--port 5002] [--model-uri models:/tudui-classifier@champion]

Loads the model in this process and serves MLflow's scoring app (mlflow.pyfunc.scoring_server: /invocations,
/ping, /health, /version) with uvicorn on 127.0.0.1, with this venv's packages: nothing is installed or
downloaded, so it works offline. The model is tracking.registered_model's @champion in the project's tracking
store (model_uri() decides; `make promote` moves the alias, and a restart serves the new champion), unless
--model-uri (MODEL_URI in make) names another. Without a champion it stops with one line naming `make promote`.
POST base64 image files to /invocations (docs/serving.md).

In front of MLflow's /invocations, with the limits of params.yaml's `serve:` section:
- a body over serve.max_body_mb is refused with HTTP 413 from its Content-Length, before it is read (or,
  sent without one, as soon as the bytes read pass the limit); more than serve.max_images images is refused
  with HTTP 413 once the JSON is parsed, before a DataFrame is built;
- a wrong column, a top_k that is not a whole number >= 1 or a non-boolean invert is HTTP 400 with one line
  (MLflow's own errors would echo the whole DataFrame), and no error answer carries more than one line;
- the model decodes and runs serve.chunk images at a time, so memory stays that of one chunk;
- a request still running after serve.timeout_s is answered 504, and one whose client went away gets no
  answer: in both its work stops before the next image;
- SIGTERM or Ctrl-C stops the server: requests in flight get serve.shutdown_s to finish, then are answered
  503 and stopped, and the process exits 0; if anything still runs shutdown_s + 10 s after the signal, it
  exits 1 at once (a second Ctrl-C does so too, without waiting).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from mlflow.exceptions import MlflowException

from stages.lib.errors import PipelineError, one_line, run
from stages.lib.params import load_params
from stages.lib.tracking.runs import _configure_mlflow, tracking_uri

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")  # MLflow's JSON input fields
COLUMN = "image"
MIB = 1 << 20
TRIM_FROM = MIB  # a request body of at least this many bytes: its memory is given back to the system afterwards
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: the same stream and format as its messages


def champion(uri: str, name: str) -> str:
    """models:/<name>@champion when the registry at `uri` has that alias; else PipelineError that says how
    to make one (never the newest version instead: that is whichever run finished last)."""
    from mlflow import MlflowClient

    from stages.lib.tracking.champion import ALIAS

    hint = (f"make one with `make promote EXP=<experiment>` (`make champion` shows the best candidate), or serve "
            f"a model by URI (MODEL_URI=models:/{name}/VERSION)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # do not create one
        raise PipelineError(f"no champion to serve: {uri} does not exist yet (train with tracking.enabled: true, "
                            f"make run); then {hint}")
    try:
        MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, ALIAS)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise PipelineError(f"cannot read the model registry at {uri}: {reason(exc.message)}") from None
        raise PipelineError(f"no champion to serve: {name!r} has no @{ALIAS} in {uri}; {hint}") from None
    except Exception as exc:  # an unreachable server, a damaged store: say which, in one line
        raise PipelineError(f"cannot read the model registry at {uri}: {one_line(exc)}") from None
    return f"models:/{name}@{ALIAS}"


def model_uri(given: str, uri: str, name: str) -> str:
    """What to serve: `given` (--model-uri, MODEL_URI in make) when set, else the champion of `name` in the
    registry at `uri` (models:/<name>@champion, moved by `make promote`). The one place that decides it."""
    return given or champion(uri, name)


def describe(model: str, uri: str) -> str:
    """" (version N: experiment E, run R)" for a models:/ URI of a registered version, else ""."""
    if not model.startswith("models:/") or ("@" not in model and model.count("/") < 2):
        return ""
    try:
        from mlflow import MlflowClient

        client, path = MlflowClient(uri, registry_uri=uri), model.removeprefix("models:/")
        if "@" in path:
            version = client.get_model_version_by_alias(*path.split("@", 1))
        else:
            version = client.get_model_version(*path.split("/", 1))
        experiment = version.tags.get("dvc_exp_name")
        return f" (version {version.version}{f': experiment {experiment}' if experiment else ''}, run {version.run_id})"
    except Exception:
        return ""


def command(model: str, port: int) -> list[str]:
    """The server as a command (the serving benchmark starts it so); run it in the project root, whose
    params.yaml gives the limits."""
    return [sys.executable, "-m", "tools.serve", "--port", str(port), "--model-uri", model]


class Refused(MlflowException):
    """A request answered with `status` and a one-line `message` (JSON: error_code and message). An
    MlflowException whose message stays as it is, so that it passes unchanged through MLflow's invocations
    (which rewrites the message of others as "Failed to predict data '<the whole DataFrame>'...")."""

    message = property(lambda self: self.reason, lambda self, value: None)

    def __init__(self, status: int, message: str, code: str = "BAD_REQUEST"):
        self.reason, self.status, self.code = message, status, code
        super().__init__(message)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


def reason(message: str) -> str:
    """An MLflow error's message as one line, without the whole DataFrame MLflow puts in front of a failed
    prediction's reason ("Failed to predict data '<the DataFrame>'. \\nError: <the reason>")."""
    if message.startswith("Failed to predict data '") and "\nError: " in message:
        message = message.rsplit("\nError: ", 1)[1]
    return " ".join(message.split())[:500]


def shape(key: str, data) -> tuple[int, list | None]:
    """The number of rows (images) of MLflow's JSON input field `key`, and its column names (None when it
    has none: a plain list of values); Refused when it cannot hold a table."""
    if key == "dataframe_split":
        rows, columns = (data.get("data", []), data.get("columns")) if isinstance(data, dict) else (None, None)
        if not isinstance(rows, list) or not (columns is None or isinstance(columns, list)):
            raise Refused(400, 'dataframe_split must be {"columns": ["image"], "data": [[IMAGE], ...]}')
        return len(rows), columns
    if isinstance(data, dict) and key != "dataframe_records":  # instances or inputs: {"image": [IMAGE, ...]}
        return max((len(v) if isinstance(v, list) else 1 for v in data.values()), default=0), list(data)
    if isinstance(data, list):  # records [{"image": IMAGE}, ...], or instances/inputs as a plain list
        if data and all(isinstance(row, dict) for row in data):
            return len(data), sorted({str(column) for row in data for column in row})
        return len(data), None
    raise Refused(400, f"{key} must be a list of rows, got a JSON {type(data).__name__}")


def check_params(params) -> None:
    """What MLflow's parameter check would refuse with the whole DataFrame in its message, in one line."""
    if params is None:
        return
    if not isinstance(params, dict):
        raise Refused(400, f'params must be a JSON object such as {{"top_k": 5, "invert": true}}, got {params!r:.80}',
                      "INVALID_PARAMETER_VALUE")
    top_k = params.get("top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise Refused(400, f"top_k must be a whole number >= 1, got {json.dumps(top_k)[:80]}",
                      "INVALID_PARAMETER_VALUE")
    if not isinstance(params.get("invert", False), bool):
        raise Refused(400, f"invert must be true or false, got {json.dumps(params['invert'])[:80]}",
                      "INVALID_PARAMETER_VALUE")


class Guarded:
    """The model as MLflow's `invocations` sees it: the image limit checked on every DataFrame (CSV and
    Parquet bodies can only be counted once parsed; they are no larger than max_body_mb)."""

    def __init__(self, model, max_images: int):
        self.model, self.metadata, self.max_images = model, model.metadata, max_images

    def predict(self, data, params=None):
        if hasattr(data, "__len__") and len(data) > self.max_images:
            raise Refused(413, f"{len(data):,} images in one request is over serve.max_images ({self.max_images:,}); "
                               "send them in several requests", "RESOURCE_LIMIT_EXCEEDED")
        return self.model.predict(data, params=params)


class ServingApp:
    """MLflow's scoring app with the limits in front of its /invocations (this module's docstring).
    Everything else (/ping, /health, /version, the lifespan) is MLflow's app unchanged."""

    def __init__(self, model, serve):
        from mlflow.pyfunc import scoring_server

        self.app = scoring_server.init(model)
        self.invocations = scoring_server.invocations
        self.model, self.schema = Guarded(model, serve.max_images), model.metadata.get_input_schema()
        self.max_images, self.max_bytes, self.timeout_s = serve.max_images, int(serve.max_body_mb * MIB), serve.timeout_s
        self.limit = f"serve.max_body_mb ({serve.max_body_mb:g} MiB)"
        self.local = threading.local()  # the cancel flag of the request the current worker thread runs
        try:
            python_model = model.unwrap_python_model()
        except Exception:  # not a PythonModel: nothing to hook into
            python_model = None
        if python_model is not None and hasattr(python_model, "interrupted"):
            python_model.interrupted = self.interrupted
        if python_model is not None and hasattr(python_model, "chunk"):
            python_model.chunk = serve.chunk

    def interrupted(self) -> bool:
        cancel = getattr(self.local, "cancel", None)
        return cancel is not None and cancel.is_set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/invocations" and scope["method"] == "POST":
            await self.invoke(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def read_body(self, scope, receive) -> bytearray | None:
        """The request's body (None when the client left); Refused when it is over the limit."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:  # h11 has checked that it is a number
            raise Refused(413, f"a request body of {int(length):,} bytes is over {self.limit}; "
                               "send fewer images a request", "RESOURCE_LIMIT_EXCEEDED")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:  # sent without a Content-Length (chunked): counted as it comes
                raise Refused(413, f"a request body of more than {self.max_bytes:,} bytes is over {self.limit}; "
                                   "send fewer images a request", "RESOURCE_LIMIT_EXCEEDED")
            if not message.get("more_body", False):
                return body

    def answer(self, body: bytearray, content_type: str, cancel: threading.Event) -> tuple[int, str, bytes]:
        """(status, media type, body) for one request; run in a worker thread. Never raises."""
        self.local.cancel = cancel
        try:
            data = body
            if content_type.split(";")[0].strip().lower() == "application/json":
                try:
                    data = json.loads(body)
                except (ValueError, RecursionError) as exc:
                    raise Refused(400, f"the body is not valid JSON: {' '.join(str(exc).split())[:200]}") from None
                del body
                if not isinstance(data, dict) or sum(key in data for key in FORMATS) != 1:
                    keys = ", ".join(map(str, data)) if isinstance(data, dict) else f"a JSON {type(data).__name__}"
                    raise Refused(400, f"expected a JSON object with one of {', '.join(FORMATS)}; got {keys[:200]}")
                (key,) = [key for key in FORMATS if key in data]
                images, columns = shape(key, data[key])
                if images > self.max_images:
                    raise Refused(413, f"{images:,} images in one request is over serve.max_images "
                                       f"({self.max_images:,}); send them in several requests", "RESOURCE_LIMIT_EXCEEDED")
                if columns and COLUMN not in columns:
                    raise Refused(400, f"expected a column `{COLUMN}` of base64-encoded image files, got "
                                       f"{', '.join(map(str, columns))[:200]}")
                check_params(data.get("params"))
            else:
                data = bytes(data)
            result = self.invocations(data, content_type, self.model, self.schema)
            return result.status, result.mimetype, result.response.encode()
        except Refused as refused:
            return refused.status, "application/json", error_body(refused.code, refused.message)
        except Exception as exc:
            if isinstance(exc, MlflowException):
                if exc.get_http_status_code() >= 500:
                    log.error("prediction failed: %s%s", exc.message, getattr(exc, "stack_trace", "") or "")
                return exc.get_http_status_code(), "application/json", error_body(exc.error_code, reason(exc.message))
            log.error("prediction failed:\n%s", traceback.format_exc())
            return 500, "application/json", error_body("INTERNAL_ERROR", f"internal error: {one_line(exc)}")
        finally:
            self.local.cancel = None

    async def invoke(self, scope, receive, send):
        try:
            body = await self.read_body(scope, receive)
        except Refused as refused:  # uvicorn reads and drops the rest of the body
            await respond(send, refused.status, "application/json", error_body(refused.code, refused.message))
            return
        if body is None:
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        cancel = threading.Event()
        large = len(body) >= TRIM_FROM
        work = asyncio.ensure_future(asyncio.to_thread(self.answer, body, content_type, cancel))
        del body
        await self.run(work, cancel, receive, send)
        if large and work.done():  # answered: its memory back to the system
            await asyncio.to_thread(release_memory)
        elif large:  # abandoned: once its work has stopped
            work.add_done_callback(lambda _: release_memory())

    async def run(self, work, cancel: threading.Event, receive, send) -> None:
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            done, _ = await asyncio.wait({work, gone}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # uvicorn stopped waiting for it: the server is stopping
            cancel.set()
            gone.cancel()
            log.warning("abandoned a request in flight: the server is stopping")
            await respond(send, 503, "application/json", error_body(
                "TEMPORARILY_UNAVAILABLE", "the server is stopping; the request was abandoned"))
            return  # not re-raised: the task ends, answered, and uvicorn finishes its shutdown
        gone.cancel()
        if work in done:
            await respond(send, *work.result())
            return
        cancel.set()  # the worker stops before its next image
        if gone in done:
            log.warning("abandoned a request whose client went away")
            return
        log.warning("abandoned a request after serve.timeout_s (%g s)", self.timeout_s)
        await respond(send, 504, "application/json", error_body(
            "DEADLINE_EXCEEDED", f"the request took more than serve.timeout_s ({self.timeout_s:g} s); "
                                 "send fewer images a request"))


def release_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim): the strings of a large request
    leave the heap fragmented, and glibc would keep its high-water mark for good. Elsewhere, nothing."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


async def disconnected(receive) -> None:
    """Returns when the client has gone away (the whole body has been read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(send, status: int, media_type: str, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_server(app, port: int, shutdown_s: float):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopped by SIGTERM or Ctrl-C within shutdown_s (+ 10 s, whatever runs): see the
        module's docstring. Unlike uvicorn's, it does not raise the signal again once it has stopped: the
        process exits 0 after a clean shutdown."""

        watchdog = None

        def handle_exit(self, sig, frame):
            if self.watchdog is None:
                self.watchdog = threading.Timer(shutdown_s + 10, self.force_quit,
                                                args=(f"still running {shutdown_s + 10:g} s after the signal to stop",))
                self.watchdog.daemon = True
                self.watchdog.start()
            elif sig == signal.SIGINT:  # a second Ctrl-C: no more waiting
                self.force_quit("a second Ctrl-C")
            super().handle_exit(sig, frame)

        @staticmethod
        def force_quit(why: str) -> None:  # from a signal handler or a timer: no locks (logging has some)
            os.write(2, f"ERROR:    {why}: exiting now\n".encode())
            os._exit(1)

        @contextlib.contextmanager
        def capture_signals(self):
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="info",
                            timeout_graceful_shutdown=shutdown_s)
    return Server(config)


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=5002, help="port on 127.0.0.1")
    parser.add_argument("--model-uri", default="", help="serve this model instead (models:/NAME@ALIAS, "
                        "models:/NAME/VERSION, runs:/RUN_ID/model, a folder)")


def main(args) -> None:
    if not 0 < args.port < 65536:
        raise PipelineError(f"--port must be 1..65535, got {args.port}")
    params = load_params()
    tracking = params.tracking
    _configure_mlflow(tracking.timeout_s)
    uri = tracking_uri(tracking)
    model = model_uri(args.model_uri, uri, tracking.registered_model)
    import mlflow
    from mlflow.pyfunc import scoring_server

    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve in the project's registry
    mlflow.set_registry_uri(uri)
    try:
        pyfunc = scoring_server.load_model_with_mlflow_config(model)  # SERVING_MODEL_CONFIG applies, as with mlflow
    except Exception as exc:
        raise PipelineError(f"cannot load {model}: {one_line(exc)}") from None
    server = make_server(ServingApp(pyfunc, params.serve), args.port, params.serve.shutdown_s)
    limits = params.serve
    print(f"serving {model}{describe(model, uri)} (store {uri}) on http://127.0.0.1:{args.port}/invocations; at most "
          f"{limits.max_images:,} images and {limits.max_body_mb:g} MiB a request; Ctrl-C stops it", flush=True)
    server.run()
    if not server.started:  # the port was taken: uvicorn has said so
        sys.exit(1)


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
