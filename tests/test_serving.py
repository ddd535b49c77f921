"""The served model: export logs a pyfunc over image files and registers it; it loads without this
repository; `python -m tools.serve` (what `make serve` runs) serves the newest registered version over
HTTP, answers as `tools.predict` does, refuses bad payloads with one line and keeps serving."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, clean_env, free_port, run_stage, sh, wait_until_healthy, write_params
from tools import predict as P
from stages.lib.modelfile import load_model

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
NAME = "tudui-classifier"  # tracking.registered_model in params.yaml


@pytest.fixture(scope="module")
def served(trained_project, tmp_path_factory) -> Path:
    """trained_project rerun with tracking on: train opens the MLflow run, export logs the served model to
    it and registers version 1 in the project's sqlite store."""
    folder = tmp_path_factory.mktemp("served") / "project"
    shutil.copytree(trained_project, folder)
    write_params(folder, {"tracking": {"enabled": True, "uri": ""}})
    for stage in ("train", "evaluate", "export"):
        result = run_stage(folder, stage)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
        assert "warning: MLflow" not in result.stderr, result.stderr
    assert f"registered {NAME} version 1 (models:/{NAME}/1)" in result.stdout
    return folder


@pytest.fixture(scope="module")
def client(served):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{served / 'mlflow.db'}")


@pytest.fixture(scope="module")
def loaded(served):
    return load_model(served / "models/model.pt")


@pytest.fixture(scope="module")
def pictures(served, tmp_path_factory) -> list[Path]:
    """Real test images as files of several formats and modes: grayscale PNGs, an RGB JPEG, an RGBA
    PNG and an enlarged PNG (the server must fit each to 28×28 as predict does)."""
    folder = tmp_path_factory.mktemp("pictures")
    split = torch.load(served / "data/prepared/test.pt", weights_only=True)
    crops = split["images"][:6, 0, 2:30, 2:30].numpy()
    paths = []
    for i, gray in enumerate(crops[:3]):
        paths.append(folder / f"test{i}.png")
        Image.fromarray(gray, "L").save(paths[-1])
    paths.append(folder / "test3.jpg")
    Image.fromarray(crops[3], "L").convert("RGB").save(paths[-1], quality=90)
    paths.append(folder / "test4_rgba.png")
    Image.fromarray(crops[4], "L").convert("RGBA").save(paths[-1])
    paths.append(folder / "test5_big.png")
    Image.fromarray(crops[5], "L").resize((280, 280), Image.Resampling.NEAREST).save(paths[-1])
    return paths


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_same_answers(rows: list[dict], expected: list[dict]) -> None:
    """Served rows vs tools.predict's: the same classes in the same order, the same probabilities up to
    the 4-decimal rounding both apply (ONNX Runtime and PyTorch differ by ~1e-7 before it)."""
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected):
        assert [t["class"] for t in row["top"]] == [t["class"] for t in want["top"]]
        assert [t["probability"] for t in row["top"]] == pytest.approx([t["probability"] for t in want["top"]],
                                                                     abs=2e-4)
        assert (row["class"], row["probability"]) == (row["top"][0]["class"], row["top"][0]["probability"])


def test_export_registers_a_version_of_the_logged_pyfunc(served, client):
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    run_id = json.loads((served / "models/mlflow_run.json").read_text())["run_id"]
    assert int(version.version) == 1 and version.run_id == run_id
    eval_metrics = json.loads((served / "metrics/eval.json").read_text())
    assert version.tags["test_accuracy"] == str(eval_metrics["test_accuracy"])
    assert version.tags["dvc_exp_name"] == "workspace"  # a plain stage run, not a DVC experiment
    assert {"git_commit", "prepared_data_md5"} <= set(version.tags)  # values: tests/test_tracking.py (a real DVC repo)


def download(served: Path, dest: Path, monkeypatch) -> Path:
    """Version 1's files, fetched from the registry as any client would: through its models:/ URI."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{served / 'mlflow.db'}")  # resolves models:/ URIs
    return Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(dest)))


def test_logged_model_has_signature_and_a_real_test_image_as_example(served, tmp_path, monkeypatch):
    import yaml

    folder = download(served, tmp_path, monkeypatch)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "name": "image", "required": False}]
    assert [o["name"] for o in json.loads(mlmodel["signature"]["outputs"])] == ["class", "probability", "top"]
    assert {p["name"]: p["default"] for p in json.loads(mlmodel["signature"]["params"])} == {"top_k": 3, "invert": False}
    assert (folder / "artifacts/model.onnx").read_bytes() == (served / "models/export/model.onnx").read_bytes()
    example = json.loads((folder / "serving_input_example.json").read_text())
    (png,) = example["dataframe_split"]["data"][0]
    with Image.open(io.BytesIO(base64.b64decode(png))) as image:
        assert image.format == "PNG" and image.size == (28, 28)
        pixels = np.asarray(image)
    first = torch.load(served / "data/prepared/test.pt", weights_only=True)["images"][0, 0, 2:30, 2:30]
    assert np.array_equal(pixels, first.numpy())  # the first test image, as the data set stores it


LOAD_ELSEWHERE = """
import json, sys
sys.modules["stages"] = None  # `import stages` now fails: this repository is not used, whatever is installed
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("model")
images = json.load(open("images.json"))
rows = model.predict(pd.DataFrame({"image": images}), params={"top_k": 3}).to_dict(orient="records")
print(json.dumps({"rows": rows, "images": sys.modules["images"].__file__,
                  "project": sorted(m for m, module in sys.modules.items()
                                    if m.split(".")[0] == "stages" and module is not None)}))
"""


def test_registered_model_loads_without_this_repository(served, loaded, pictures, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "model").mkdir(parents=True)
    assert not elsewhere.resolve().is_relative_to(REPO)
    download(served, elsewhere / "model", monkeypatch)
    (elsewhere / "images.json").write_text(json.dumps([b64(p.read_bytes()) for p in pictures]))
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    # -I: no PYTHONPATH, no user site, not even the current folder on sys.path
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_ELSEWHERE], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(answer["images"]) == elsewhere / "model/code/images.py"  # the copy inside the model
    assert answer["project"] == []
    model, ckpt = loaded
    check_same_answers(answer["rows"], P.predict(model, ckpt, pictures, top=3))


def post(base: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def images_payload(*images: str, **params) -> dict:
    return {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}, "params": params}


def bomb() -> bytes:
    """A 9000×9000 PNG in about 10 kB: 81 M pixels, over the decoder's 64 M limit."""
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000
    return buffer.getvalue()


def readme_block(containing: str) -> str:
    """The README's fenced code block that holds the line `containing`."""
    blocks = (REPO / "README.md").read_text().split("```")[1::2]
    (block,) = [b.split("\n", 1)[1] for b in blocks if containing in b]
    return block


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_server_answers_like_predict_refuses_bad_payloads_and_stops_cleanly(served, client, loaded, pictures,
                                                                             tmp_path, monkeypatch):
    import mlflow

    # a second version, so that "the newest" is not just "the only one"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{served / 'mlflow.db'}")
    (first,) = client.search_model_versions(f"name = '{NAME}'")
    assert int(mlflow.register_model(first.source, NAME).version) == 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "tools.serve", "--port", str(port)], cwd=served,
                                  env=clean_env(PYTHONPATH=str(REPO)), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def server_log() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        wait_until_healthy(base, server, 300, server_log)
        assert f"serving models:/{NAME}/2 " in server_log()

        model, ckpt = loaded
        status, answer = post(base, images_payload(*(b64(p.read_bytes()) for p in pictures)))
        assert status == 200, answer
        check_same_answers(answer["predictions"], P.predict(model, ckpt, pictures, top=3))
        status, answer = post(base, images_payload(b64(pictures[0].read_bytes()), top_k=5, invert=True))
        assert status == 200, answer
        check_same_answers(answer["predictions"], P.predict(model, ckpt, pictures[:1], top=5, invert=True))

        good = b64(pictures[0].read_bytes())
        bad = {
            "not base64": (images_payload(good, "this is not base64!"), "image 1: not base64"),
            "not an image": (images_payload(b64(b"just some text, not a picture")),
                             "image 0: not a readable image (unknown format)"),
            "decompression bomb": (images_payload(b64(bomb())), "image 0: 9000×9000 is too large to decode safely"),
            "empty list": (images_payload(), "no images: the request holds an empty list"),
            "empty records": ({"dataframe_records": []}, "no images: the request holds an empty list"),
        }
        # the README's curl, as a reader runs it from the repo root, on the image it names
        curl = readme_block("curl -s http://127.0.0.1:5002/invocations").replace("5002", str(port))
        out = subprocess.run(["bash", "-c", curl], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        check_same_answers(json.loads(out.stdout)["predictions"],
                           P.predict(model, ckpt, [REPO / "examples/ankle-boot.png"], top=3))

        for what, (payload, reason) in bad.items():
            status, answer = post(base, payload)
            assert 400 <= status < 500, (what, status, answer)
            assert answer["message"].startswith(reason), (what, answer["message"])
            assert "\n" not in answer["message"] and "stack_trace" not in answer
            status, _ = post(base, images_payload(good))
            assert status == 200, f"the server stopped answering after {what}"
        assert server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the terminal that runs `make serve`
        try:
            returncode = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            raise
    assert returncode == 0, server_log()
    assert "Application shutdown complete" in server_log() and "Traceback" not in server_log(), server_log()
    with pytest.raises(ProcessLookupError):  # uvicorn, started by mlflow's CLI, is gone too
        os.killpg(server.pid, 0)
    assert port_closed(port)


def test_serve_without_a_registered_version_is_one_line(served, tmp_path):
    write_params(tmp_path, {"tracking": {"enabled": True, "uri": ""}})
    result = run_stage(tmp_path, "tools.serve", "--port", str(free_port()), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: no version of '{NAME}' is registered: sqlite:///{tmp_path / 'mlflow.db'} does not exist yet; "
        "run the pipeline with tracking.enabled: true (`dvc repro --force train` when it ran without; export "
        "registers a version), or pass a model URI (MODEL_URI=...)"]
    assert not (tmp_path / "mlflow.db").exists()

    # a store with runs but no version of this name
    shutil.copy(served / "mlflow.db", tmp_path / "mlflow.db")
    write_params(tmp_path, {"tracking": {"enabled": True, "uri": "", "registered_model": "another-model"}})
    result = run_stage(tmp_path, "tools.serve", "--port", str(free_port()), timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no version of 'another-model' is registered in sqlite:///"), \
        result.stderr


def test_make_serve_runs_stages_serve_with_port_and_model_uri():
    out = sh(REPO, "make", "-n", "serve", "SERVE_PORT=5999", f"MODEL_URI=models:/{NAME}@champion", stdout_only=True)
    assert f"-m tools.serve --port 5999 --model-uri 'models:/{NAME}@champion'" in out
    out = sh(REPO, "make", "-n", "serve", stdout_only=True)
    assert "-m tools.serve --port 5002" in out and "--model-uri" not in out


@pytest.mark.slow
def test_serving_benchmark_measures_both_runtimes_over_http(served, tmp_path):
    """benchmarks/serve_bench.py (make bench-serve) on a tiny budget: both pyfunc runtimes really serve and
    the report is complete. (The latency and throughput targets are measured, never asserted in tests.)"""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/serve_bench.py"), "--project", str(served),
                             "--requests", "10", "--batches", "2", "--port", str(free_port()), "--out", str(tmp_path)],
                            env=clean_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["batch"] == 256
    assert [r["backend"] for r in report["results"]] == ["onnxruntime", "pytorch"]
    for r in report["results"]:
        for where in ("http", "in_process"):
            assert 0 < r[where]["p50_ms"] <= r[where]["p99_ms"] and r[where]["images_per_s"] > 0
        assert "Application shutdown complete" in (tmp_path / f"serve_{r['backend']}.log").read_text()
    table = (tmp_path / "serving.md").read_text()
    assert "| onnxruntime |" in table and "| pytorch |" in table


def test_readme_onnxruntime_snippet_runs_without_the_project(served, loaded, tmp_path):
    """The README's snippet: model.onnx and an image file, onnxruntime and Pillow, nothing else."""
    (tmp_path / "models/export").mkdir(parents=True)
    shutil.copy(served / "models/export/model.onnx", tmp_path / "models/export")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    snippet = "import sys\nsys.modules['stages'] = None\n" + readme_block("onnxruntime.InferenceSession")
    result = subprocess.run([sys.executable, "-I", "-c", snippet], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    model, ckpt = loaded
    [expected] = P.predict(model, ckpt, [REPO / "examples/ankle-boot.png"], top=1)
    assert result.stdout.strip() == expected["top"][0]["class"]
