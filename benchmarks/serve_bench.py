"""Serving benchmark: the served model over HTTP, with ONNX Runtime and with PyTorch inside the pyfunc.

    python benchmarks/serve_bench.py [--project .] [--requests 300] [--batches 20] [--threads 1,2]
                                     [--clients 20] [--seconds 10] [--out benchmarks/results]

Needs the pipeline's outputs (`dvc repro export`): models/model.pt, models/export/model.onnx and the
prepared test split, whose images are sent as PNG files, base64-encoded, the way a client would. Builds
the served MLflow model twice (stages/lib/tracking/pyfunc.py), once running model.onnx in ONNX Runtime (what export
logs into its run) and once a torch.export program of the same raw-image net in PyTorch, and serves each with
`python -m tools.serve --model-uri FOLDER` on 127.0.0.1 (what `make serve` runs; its limits are the serve:
section of this checkout's params.yaml). For each it measures

- latency: `--requests` sequential requests of one image each (after 30 warm-up requests), client-side
  wall time of the whole round trip over one keep-alive connection: p50 and p99;
- throughput: `--batches` sequential requests of 256 images each: images per second;
- the same two without HTTP (the pyfunc's predict called in this process), to show where the time goes.

and for the served configuration (ONNX Runtime, 1 thread a request):

- load: `--clients` clients at once, each sending single-image requests over its own keep-alive
  connection for `--seconds` seconds: requests, errors (anything but HTTP 200), p50 and p99;
- memory: the server process's RSS when idle, after a request of 2,000 images, after a 50 MB request of
  valid images (about 99,000: refused with 413 when over serve.max_body_mb) and after a request at both
  limits (serve.max_images images in a body of just under serve.max_body_mb), and its peak (VmHWM).

Writes serving.json and serving.md to --out and prints the tables.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
BATCH = 256
TARGETS = {"p50_ms": 20.0, "images_per_s": 1000.0}  # the serving targets on a 2-core CPU (docs/benchmarks.md)


def build_models(project: Path, folder: Path, variants: list[tuple[str, int]]) -> tuple[dict, list[str]]:
    """{(backend, threads): served MLflow model folder}, and BATCH test images as base64 PNG files."""
    import mlflow.pyfunc

    from stages.lib.prepared import load_split
    from stages.lib.modelfile import load_model
    from stages.lib.transforms import unpad
    from stages.lib.tracking.pyfunc import b64, model_spec, png_bytes, save_program

    model, model_file = load_model(project / "models/model.pt")
    prepared, _ = load_split("test", project / "data/prepared")
    raw = unpad(prepared[:BATCH], model_file.input["size"])
    images = [b64(png_bytes(image)) for image in raw]
    artifacts = {"onnxruntime": project / "models/export/model.onnx", "pytorch": folder / "model.pt2"}
    if any(backend == "pytorch" for backend, _ in variants):
        save_program(model_file.raw_net(model), raw[:2], artifacts["pytorch"])
    models = {}
    for backend, threads in variants:
        models[backend, threads] = folder / f"{backend}-{threads}"
        spec = model_spec(artifacts[backend], model_file.classes, model_file.input, png_bytes(raw[0]))
        spec["model_config"]["request_threads"] = threads
        mlflow.pyfunc.save_model(str(models[backend, threads]), **spec)
    return models, images


def payload(images: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}).encode()


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def request(connection: http.client.HTTPConnection, body: bytes) -> float:
    """One POST /invocations; its round-trip seconds."""
    began = time.perf_counter()
    status, data = post(connection, body)
    elapsed = time.perf_counter() - began
    if status != 200:
        raise SystemExit(f"HTTP {status}: {data[:300]!r}")
    return elapsed


def serve(folder: Path, port: int, log: Path) -> subprocess.Popen:
    from tools.serve import command

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command(str(folder), port), cwd=ROOT, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit(f"no /health after 300 s:\n{log.read_text()[-2000:]}")


def measure(send, images: list[str], requests: int, batches: int) -> dict:
    """send(list of base64 images) -> seconds; the latency and throughput numbers."""
    singles = [[image] for image in images]
    for i in range(30):
        send(singles[i % len(singles)])
    latency = np.array([send(singles[i % len(singles)]) for i in range(requests)]) * 1000
    send(images)
    seconds = sum(send(images) for _ in range(batches))
    return {"p50_ms": round(float(np.percentile(latency, 50)), 2), "p99_ms": round(float(np.percentile(latency, 99)), 2),
            "images_per_s": round(batches * len(images) / seconds, 0)}


def rss_mb(pid: int) -> dict:
    """The process's resident memory now and at its peak, in MB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(status[field].split()[0]) / 1024, 1) for key, field in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def noise_png(side: int, seed: int) -> str:
    """A side×side grayscale PNG of random pixels (incompressible: its size is about side²), base64."""
    from PIL import Image
    import base64
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8), "L").save(
        buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def at_the_limit(max_images: int, max_bytes: int) -> bytes:
    """A request of max_images images whose body is just under max_bytes (each a PNG of random pixels of
    the size that fills it; the model resizes them to its input)."""
    side = int(((max_bytes / max_images) * 0.75) ** 0.5) + 1
    while True:
        body = payload([noise_png(side, 0)] * max_images)
        if len(body) <= max_bytes or side == 1:
            return body
        side -= 1


def memory(port: int, pid: int, images: list[str]) -> dict:
    """RSS of the server process (`pid`) idle, after 2,000 images, after a 50 MB request, after one at the
    limits (serve: in params.yaml), each answered as it should be."""
    from stages.lib.params import load_params

    limits = load_params(ROOT / "params.yaml").serve
    max_bytes = int(limits.max_body_mb * (1 << 20))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for _ in range(5):
        request(connection, payload(images[:1]))
    out = {"idle": rss_mb(pid)["rss"]}
    fifty, size = 0, len(payload([]))  # the tester's 50 MB request (about 99,000 of its images)
    while size - 2 < 50_000_000:  # the last row has no ", "
        size += len(images[fifty % len(images)]) + len('[""], ')
        fifty += 1
    steps = [("2000_images", 2000, payload([images[i % len(images)] for i in range(2000)])),
             ("50mb", fifty, payload([images[i % len(images)] for i in range(fifty)])),
             ("at_limit", limits.max_images, at_the_limit(limits.max_images, max_bytes))]
    for name, count, body in steps:
        began = time.perf_counter()
        status, answer = post(connection, body)
        expected = 413 if len(body) > max_bytes or count > limits.max_images else 200
        if status != expected:
            raise SystemExit(f"{name}: HTTP {status} (expected {expected}): {answer[:300]!r}")
        out[name] = {"images": count, "bytes": len(body), "status": status, "seconds": round(time.perf_counter() - began, 2),
                     "rss_mb": rss_mb(pid)["rss"]}
    out["peak"] = rss_mb(pid)["peak"]
    out["limits"] = {"max_images": limits.max_images, "max_body_mb": limits.max_body_mb, "chunk": limits.chunk}
    return out


def load_test(port: int, images: list[str], clients: int, seconds: float) -> dict:
    """`clients` threads, each sending single-image requests over its own connection for `seconds`."""
    bodies = [payload([image]) for image in images]
    latencies, errors, lock = [], [0], threading.Lock()
    start = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, failed = [], 0
        start.wait()
        deadline = time.perf_counter() + seconds
        i = index
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                status, _ = post(connection, bodies[i % len(bodies)])
            except (OSError, http.client.HTTPException):
                status = 0
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            if status == 200:
                mine.append(time.perf_counter() - began)
            else:
                failed += 1
            i += clients
        connection.close()
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    start.wait()
    for worker in workers:
        worker.join()
    ms = np.array(latencies or [0.0]) * 1000
    return {"clients": clients, "seconds": seconds, "requests": len(latencies) + errors[0], "errors": errors[0],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "requests_per_s": round(len(latencies) / seconds, 1)}


def bench_backend(backend: str, threads: int, folder: Path, images: list[str], args) -> dict:
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model(str(folder))

    def in_process(batch):
        frame = pd.DataFrame({"image": batch})
        began = time.perf_counter()
        model.predict(frame)
        return time.perf_counter() - began

    local = measure(in_process, images, args.requests, args.batches)
    del model
    port = args.port
    log = args.out / f"serve_{backend}{'' if threads == 1 else f'_{threads}threads'}.log"
    server = serve(folder, port, log)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        bodies = {}

        def over_http(batch):
            key = batch[0] if len(batch) == 1 else None
            body = bodies.get(key) or payload(batch)
            bodies[key] = body
            return request(connection, body)

        remote = measure(over_http, images, args.requests, args.batches)
        connection.close()
        result = {"backend": backend, "threads": threads, "http": remote, "in_process": local}
        if (backend, threads) == ("onnxruntime", 1):  # the served configuration
            print(f"  {args.clients} clients for {args.seconds:g} s ...", flush=True)
            result["load"] = load_test(port, images, args.clients, args.seconds)
            print("  memory ...", flush=True)
            result["memory"] = memory(port, server.pid, images)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=120)
    return result


def markdown(results: list[dict], machine: str, load: str) -> str:
    lines = [f"Machine: {machine}", f"Load average (1 min) before/after: {load}", "",
             f"| pyfunc runtime | threads | HTTP p50 ms (1 image) | HTTP p99 ms | HTTP images/s ({BATCH} a request) | "
             f"in-process p50 ms | in-process images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        h, p = r["http"], r["in_process"]
        lines.append(f"| {r['backend']} | {r['threads']} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['images_per_s']:,.0f} | "
                     f"{p['p50_ms']:.1f} | {p['images_per_s']:,.0f} |")
    lines += ["", f"Targets: p50 ≤ {TARGETS['p50_ms']:.0f} ms for one image, ≥ {TARGETS['images_per_s']:,.0f} images/s "
              f"over HTTP in batches of {BATCH}.", ""]
    for r in results:
        h = r["http"]
        ok = h["p50_ms"] <= TARGETS["p50_ms"] and h["images_per_s"] >= TARGETS["images_per_s"]
        lines.append(f"- {r['backend']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''}: p50 {h['p50_ms']:.1f} ms, {h['images_per_s']:,.0f} images/s: "
                     f"{'meets both targets' if ok else 'misses a target'}")
    for r in results:
        if "load" in r:
            lo = r["load"]
            lines += ["", f"{lo['clients']} clients at once for {lo['seconds']:g} s ({r['backend']}, {r['threads']} thread a "
                          "request; each sends one image a request over its own connection):", "",
                      "| requests | errors | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|",
                      f"| {lo['requests']:,} | {lo['errors']:,} | {lo['requests_per_s']:,.1f} | {lo['p50_ms']:.1f} | "
                      f"{lo['p99_ms']:.1f} |"]
        if "memory" in r:
            m = r["memory"]
            lim = m["limits"]
            lines += ["", f"Server memory (RSS of the server process; limits: serve.max_images {lim['max_images']:,}, "
                          f"serve.max_body_mb {lim['max_body_mb']:g}, serve.chunk {lim['chunk']}):", "",
                      "| after | request bytes | HTTP | seconds | RSS MB |", "|---|---|---|---|---|",
                      f"| start and 5 single images | | | | {m['idle']:.0f} |"]
            for name, label in (("2000_images", "2,000 images"), ("50mb", f"50 MB of images ({m['50mb']['images']:,})"),
                                ("at_limit", f"{lim['max_images']:,} images, just under the body limit")):
                step = m[name]
                lines.append(f"| {label} | {step['bytes']:,} | {step['status']} | {step['seconds']:.2f} | "
                             f"{step['rss_mb']:.0f} |")
            lines += ["", f"Peak RSS (VmHWM): {m['peak']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="where models/ and data/prepared/ are")
    parser.add_argument("--requests", type=int, default=300, help="single-image requests timed")
    parser.add_argument("--batches", type=int, default=20, help=f"requests of {BATCH} images timed")
    parser.add_argument("--backends", default="onnxruntime,pytorch", help="comma-separated, of onnxruntime,pytorch")
    parser.add_argument("--threads", default="1", help="comma-separated CPU threads per request to compare "
                        "(the served model's `request_threads` config; 1 is what export logs)")
    parser.add_argument("--clients", type=int, default=20, help="clients at once in the load test")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the load test")
    parser.add_argument("--port", type=int, default=5012)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = parser.parse_args()
    if not all((args.project / p).exists() for p in ("models/model.pt", "models/export/model.onnx", "data/prepared")):
        sys.exit(f"{args.project}: models/model.pt, models/export/model.onnx or data/prepared not found; "
                 "run `dvc repro export` first")
    backends = args.backends.split(",")
    unknown = sorted(set(backends) - {"onnxruntime", "pytorch"})
    if unknown:
        sys.exit(f"error: unknown backend {unknown[0]!r}; choose from onnxruntime, pytorch")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        sys.exit(f"error: --threads takes whole numbers separated by commas, got {args.threads!r}")
    variants = [(backend, threads) for backend in backends for threads in thread_counts]
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        models, images = build_models(args.project, Path(tmp), variants)
        results = []
        for backend, threads in variants:
            print(f"measuring {backend}, {threads} thread(s) ...", flush=True)
            results.append(bench_backend(backend, threads, models[backend, threads], images, args))
            print(f"  {results[-1]}", flush=True)
    load = f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}, "
               f"{time.strftime('%Y-%m-%d')}")
    (args.out / "serving.json").write_text(json.dumps({"machine": machine, "load_average": load, "batch": BATCH,
                                                       "targets": TARGETS, "results": results}, indent=2) + "\n")
    table = markdown(results, machine, load)
    (args.out / "serving.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
