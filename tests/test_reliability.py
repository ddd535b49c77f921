"""Fault injection: a training killed with SIGKILL or Ctrl-C, unwritable outputs, atomic writes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, clean_env, run_stage, write_params
from stages.checkpoint import load_checkpoint
from stages.errors import PipelineError
from stages.files import atomic_path, write_json

# Enough images that an epoch takes a few seconds, so the kill lands mid-training.
LONGER = {"preprocess": {"val_size": 100, "max_train": 3100}, "train": {"epochs": 3}}


def start_train(folder):
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=folder, env=clean_env(PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(folder, process, timeout=120):
    path = folder / "models/checkpoint.pt"
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    return path


@pytest.fixture(scope="module")
def longer_project(tmp_path_factory, mirror):
    folder = tmp_path_factory.mktemp("longer")
    write_params(folder, {**LONGER, "data": {"mirrors": [str(mirror)]}})
    for stage in ("download", "preprocess"):
        assert run_stage(folder, stage).returncode == 0
    return folder


def copy_of(project, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(project, folder)
    return folder


@pytest.mark.slow
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(longer_project, tmp_path):
    whole = copy_of(longer_project, tmp_path, "whole")
    assert run_stage(whole, "train").returncode == 0

    killed = copy_of(longer_project, tmp_path, "killed")
    process = start_train(killed)
    wait_for_checkpoint(killed, process)
    time.sleep(0.7)  # somewhere in the next epoch, possibly while a checkpoint is being written
    process.send_signal(signal.SIGKILL)
    process.communicate()
    epoch = load_checkpoint(killed / "models/checkpoint.pt")["epoch"]
    assert 1 <= epoch < 3 and not (killed / "models/model.pt").exists()

    rerun = run_stage(killed, "train")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from models/checkpoint.pt after epoch {epoch}" in rerun.stdout
    for name in ("metrics/train.json", "metrics/train_history.csv"):
        assert (killed / name).read_text() == (whole / name).read_text(), name
    a = torch.load(whole / "models/model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "models/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.rglob(".*.tmp"))  # no temp file left behind by the kill


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoint(longer_project, tmp_path):
    folder = copy_of(longer_project, tmp_path, "interrupted")
    process = start_train(folder)
    wait_for_checkpoint(folder, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in stderr
    assert load_checkpoint(folder / "models/checkpoint.pt")["epoch"] >= 1


def test_changed_settings_start_over(longer_project, tmp_path):
    from stages.checkpoint import FORMAT

    folder = copy_of(longer_project, tmp_path, "changed")
    (folder / "models").mkdir()
    torch.save({"format": FORMAT, "model": {}, "state_dict": {}, "epoch": 1, "fingerprint": "another run"},
               folder / "models/checkpoint.pt")
    write_params(folder, {"train": {"epochs": 1}})
    result = run_stage(folder, "train")
    assert result.returncode == 0, result.stderr
    assert "trained with other settings or data: starting over" in result.stdout


def test_unwritable_output_is_one_clear_line(trained_project, tmp_path):
    folder = copy_of(trained_project, tmp_path, "unwritable")
    shutil.rmtree(folder / "metrics")
    (folder / "metrics").write_text("a file where the metrics folder should be")
    result = run_stage(folder, "evaluate")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: cannot write metrics/eval.json: File exists (metrics)"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(PipelineError, match="cannot write"):
        write_json(path / "below-a-file.json", {})


def test_debug_flag_shows_the_traceback(tmp_path):
    write_params(tmp_path)
    plain, debug = run_stage(tmp_path, "evaluate"), run_stage(tmp_path, "evaluate", "--debug")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "PipelineError" in debug.stderr
    assert os.listdir(tmp_path) == ["params.yaml"]


def test_out_of_space_is_one_clear_line_and_leaves_the_old_files(trained_project, tmp_path):
    """A write that the disk refuses (here a file-size limit, which fails writes exactly like a full disk
    does, with no mount needed) stops the stage with one line and leaves the previous outputs whole."""
    import resource

    folder = copy_of(trained_project, tmp_path, "full")
    before = (folder / "models/export/state_dict.pt").read_bytes()
    assert len(before) > 64 * 1024

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    result = subprocess.run([sys.executable, "-m", "stages.export"], cwd=folder, env=clean_env(PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: cannot write models/export/state_dict.pt: File too large"]
    assert (folder / "models/export/state_dict.pt").read_bytes() == before
    assert not list(folder.rglob(".*.tmp"))
