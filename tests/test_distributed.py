"""torchrun + DistributedDataParallel on CPU (gloo): two processes train like one, write like one, and
their checkpoints resume in a single process; two "nodes" meeting through the c10d rendezvous on
loopback do the same."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, clean_env, free_port, run_stage, write_params
from stages.lib.modelfile import load_model


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_in_one(trained_project, tmp_path):
    folder = tmp_path / "ddp"
    folder.mkdir()
    shutil.copytree(trained_project / "data", folder / "data")
    write_params(folder, {"train": {"nproc": 2}})
    result = run_stage(folder, "train")
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout and result.stdout.count("wrote models/model.pt") == 1

    single = json.loads((trained_project / "metrics/train.json").read_text())
    ddp = json.loads((folder / "metrics/train.json").read_text())
    # The same global batches, gradients averaged over two halves: the tutorial net (no BatchNorm)
    # ends where one process ends, up to float rounding.
    assert ddp["train_loss"] == pytest.approx(single["train_loss"], rel=1e-3)
    assert abs(ddp["val_accuracy"] - single["val_accuracy"]) <= 0.02
    assert json.loads((folder / "metrics/train_env.json").read_text())["processes"] == 2
    model, ckpt = load_model(folder / "models/model.pt")  # a plain single-process model file
    assert not any(key.startswith("module.") for key in ckpt.state_dict)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)

    write_params(folder, {"train": {"nproc": 1, "epochs": 2}})
    resumed = run_stage(folder, "train")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from models/checkpoint.pt after epoch 1" in resumed.stdout
    assert json.loads((folder / "metrics/train.json").read_text())["epochs"] == 2


def torchrun_node(folder, port: int, is_host: bool) -> subprocess.Popen:
    """One "machine" of a two-node job: torchrun with the c10d rendezvous, as the README's recipe runs it,
    with loopback standing in for the network; its output goes to folder/../<name>.out."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tudui-test",
               # who hosts the rendezvous store is otherwise guessed from the host name: both would claim it
               "--rdzv-conf", f"is_host={int(is_host)},join_timeout=600,read_timeout=300",
               "--local-addr", "127.0.0.1", "-m", "stages.train"]
    env = clean_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    with open(folder.with_suffix(".out"), "w") as log:
        return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_all(procs: list, timeout: float) -> None:
    """Until every process has exited; the first failure (or the deadline) kills the rest, whose
    rendezvous would otherwise wait for the missing node."""
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs):
        if any(proc.returncode for proc in procs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_train_like_one_process(trained_project, tmp_path):
    nodes = []
    for name in ("node0", "node1"):  # each "machine" has its own checkout with the prepared data
        folder = tmp_path / name
        shutil.copytree(trained_project / "data" / "prepared", folder / "data" / "prepared")
        write_params(folder, {"threads": 1})  # one core per node: the two share this machine's cores
        nodes.append(folder)
    port = free_port()
    procs = [torchrun_node(folder, port, is_host=(i == 0)) for i, folder in enumerate(nodes)]
    try:
        wait_all(procs, timeout=900)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    outputs = [folder.with_suffix(".out").read_text(errors="replace") for folder in nodes]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out

    # c10d hands out the ranks: whichever node got rank 0 wrote everything, the other nothing at all.
    writers = [folder for folder in nodes if (folder / "models" / "model.pt").exists()]
    assert len(writers) == 1, [sorted(str(p.relative_to(f)) for p in f.rglob("*")) for f in nodes]
    (writer,) = writers
    (other,) = [folder for folder in nodes if folder != writer]
    assert sorted(p.name for p in other.iterdir()) == ["data", "params.yaml"]
    assert "".join(outputs).count("wrote models/model.pt") == 1
    assert "2 processes" in "".join(outputs)

    single = json.loads((trained_project / "metrics/train.json").read_text())
    two_nodes = json.loads((writer / "metrics/train.json").read_text())
    assert two_nodes["train_loss"] == pytest.approx(single["train_loss"], rel=1e-3)
    assert abs(two_nodes["val_accuracy"] - single["val_accuracy"]) <= 0.02
    assert json.loads((writer / "metrics/train_env.json").read_text())["processes"] == 2
    model, ckpt = load_model(writer / "models/model.pt")
    assert not any(key.startswith("module.") for key in ckpt.state_dict)
