"""serve — the classifier over HTTP: the newest registered version of the model (`make serve`).

    python -m tools.serve [--port 5002] [--model-uri models:/tudui-classifier@champion]

Runs `mlflow models serve --env-manager local` on 127.0.0.1 with this venv's packages: nothing is
installed or downloaded, so it works offline. The model is tracking.registered_model's highest version
in the project's tracking store, unless --model-uri (MODEL_URI in make) names another. POST base64
image files to /invocations (README: Serving the model); Ctrl-C stops it.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from stages.lib.errors import PipelineError, one_line, run
from stages.lib.params import load_params
from stages.lib.tracking.runs import _configure_mlflow, tracking_uri


def newest_version(uri: str, name: str) -> str:
    """models:/<name>/<highest version> in the registry at `uri`; PipelineError when there is none."""
    from mlflow import MlflowClient

    hint = ("run the pipeline with tracking.enabled: true (`dvc repro --force train` when it ran without; export "
            "registers a version), or pass a model URI (MODEL_URI=...)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # do not create one
        raise PipelineError(f"no version of {name!r} is registered: {uri} does not exist yet; {hint}")
    try:
        versions = MlflowClient(uri, registry_uri=uri).search_model_versions(f"name = '{name}'")
    except Exception as exc:  # an unreachable server, a damaged store: say which, in one line
        raise PipelineError(f"cannot read the model registry at {uri}: {one_line(exc)}") from None
    if not versions:
        raise PipelineError(f"no version of {name!r} is registered in {uri}; {hint}")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def command(model_uri: str, port: int) -> list[str]:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return [mlflow, "models", "serve", "--model-uri", model_uri, "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port)]


def add_arguments(parser) -> None:
    parser.add_argument("--port", type=int, default=5002, help="port on 127.0.0.1")
    parser.add_argument("--model-uri", default="", help="serve this model instead (models:/NAME@ALIAS, "
                        "models:/NAME/VERSION, runs:/RUN_ID/model, a folder)")


def main(args) -> None:
    if not 0 < args.port < 65536:
        raise PipelineError(f"--port must be 1..65535, got {args.port}")
    tracking = load_params().tracking
    _configure_mlflow(tracking.timeout_s)
    uri = tracking_uri(tracking)
    model_uri = args.model_uri or newest_version(uri, tracking.registered_model)
    venv_bin = str(Path(sys.executable).parent)  # mlflow starts uvicorn from PATH: this venv's
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(f"serving {model_uri} (store {uri}) on http://127.0.0.1:{args.port}/invocations; Ctrl-C stops it",
          flush=True)
    argv = command(model_uri, args.port)
    # Ctrl-C reaches every process of the terminal's group. Ignored here, and so in the mlflow CLI this process
    # becomes, which would otherwise abort at once; uvicorn installs its own handler, finishes the request in
    # flight, shuts down and exits 0, and then the CLI does too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.execve(argv[0], argv, env)


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0], add_arguments=add_arguments)
