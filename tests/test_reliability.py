"""Fault injection: a training killed with SIGKILL or Ctrl-C at a chosen step (TUDUI_FAULT, see
stages/lib/faults.py: deterministic, whatever the machine's speed), unwritable outputs, atomic writes."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, clean_env, run_stage, write_params
from stages.lib.modelfile import read_torch_file
from stages.lib.errors import PipelineError
from stages.lib.files import atomic_path, json_bytes, replaced_dir, write_files

# 500 training images in batches of 64: 8 SGD steps per epoch, so step 12 is in the middle of epoch 2.
THREE_EPOCHS = {"train": {"epochs": 3}}


def copy_of(project, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(project, folder)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(prepared_project, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    shutil.copytree(prepared_project, folder, dirs_exist_ok=True)
    write_params(folder, THREE_EPOCHS)
    result = run_stage(folder, "train")
    assert result.returncode == 0, result.stderr
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["sigkill@step=12", "sigkill@checkpoint=2"])
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(uninterrupted, prepared_project, tmp_path, fault):
    """Killed in the middle of epoch 2, or while epoch 2's checkpoint is being written (its temporary
    file complete, not yet renamed): the rerun resumes after epoch 1 and ends bit for bit where a run
    that was never interrupted ends."""
    killed = copy_of(prepared_project, tmp_path, "killed")
    write_params(killed, THREE_EPOCHS)
    result = run_stage(killed, "train", env={"TUDUI_FAULT": fault})
    assert result.returncode == -signal.SIGKILL
    (state,) = (killed / ".resume").iterdir()  # the resume state lives outside DVC's outputs
    assert read_torch_file(state / "checkpoint.pt")["epoch"] == 1
    assert not (killed / "models").exists() and not (killed / "logs").exists()
    if "checkpoint" in fault:
        assert list(state.glob(".checkpoint.pt.*.tmp"))  # the kill left it behind

    rerun = run_stage(killed, "train")
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from .resume/{state.name}/checkpoint.pt after epoch 1" in rerun.stdout
    assert not (killed / ".resume" / state.name).exists()  # done with: removed
    for name in ("metrics/train.json", "metrics/train_history.csv"):
        assert (killed / name).read_text() == (uninterrupted / name).read_text(), name
    a = torch.load(uninterrupted / "models/model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "models/model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(killed.rglob(".*.tmp"))  # the rerun cleared what the kill left


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoint(prepared_project, tmp_path):
    folder = copy_of(prepared_project, tmp_path, "interrupted")
    write_params(folder, THREE_EPOCHS)
    result = run_stage(folder, "train", env={"TUDUI_FAULT": "sigint@step=12"})
    assert result.returncode == 130
    assert result.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in result.stderr
    assert read_torch_file(next(folder.glob(".resume/*/checkpoint.pt")))["epoch"] == 1
    assert sorted(p.name for p in folder.iterdir()) == [".resume", "data", "params.yaml"]  # no trace in the outputs


def tracked_outputs(folder) -> dict:
    """{path: bytes} of every file of train's outputs (models/, logs/, metrics/)."""
    return {str(p.relative_to(folder)): p.read_bytes() for name in ("models", "logs", "metrics")
            for p in sorted((folder / name).rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["ctrl-c", "diverged", "params edited"])
def test_a_failed_training_changes_no_output(trained_project, tmp_path, failure):
    """A new-params run that is interrupted after its first epoch, that diverges, or whose params.yaml is
    edited while it trains leaves models/ (the checkpoint too), logs/ and metrics/ byte for byte as they
    were; the interrupted one resumes from its own state."""
    folder = copy_of(trained_project, tmp_path, "failing")
    before = tracked_outputs(folder)
    if failure == "params edited":  # stopped at step 3, params.yaml edited, then continued
        write_params(folder, {"train": {"epochs": 2, "lr": 0.02}})
        process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=folder, text=True,
                                   env=clean_env(PYTHONPATH=str(REPO), TUDUI_FAULT="sigstop@step=3"),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until_stopped(process.pid)
        write_params(folder, {"train": {"epochs": 2, "lr": 0.03}})
        os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 2
        assert stderr.strip().splitlines()[-1].startswith(
            "error: params.yaml changed while train ran (train.lr 0.02 -> 0.03): nothing was written")
    else:
        write_params(folder, {"train": {"epochs": 2, "lr": 1000.0 if failure == "diverged" else 0.02}})
        fault = {"TUDUI_FAULT": "sigint@step=12"} if failure == "ctrl-c" else {}
        result = run_stage(folder, "train", env=fault)
        assert result.returncode == (130 if failure == "ctrl-c" else 2), result.stderr
        assert failure == "ctrl-c" or "training diverged" in result.stderr
    assert tracked_outputs(folder) == before
    if failure == "ctrl-c":
        rerun = run_stage(folder, "train")
        assert rerun.returncode == 0 and "resuming from .resume/" in rerun.stdout, rerun.stderr


def wait_until_stopped(pid: int, timeout: float = 300) -> None:
    """Poll /proc until the process is stopped (SIGSTOP at its fault point), or fail after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} never reached its stop point"
        time.sleep(0.05)


def test_thread_count_is_the_param_and_is_recorded(trained_project, tmp_path):
    folder = copy_of(trained_project, tmp_path, "threads")
    write_params(folder, {"threads": 1})
    result = run_stage(folder, "train")
    assert result.returncode == 0, result.stderr
    assert "(1 threads, " in result.stdout
    assert json.loads((folder / "metrics/train_env.json").read_text())["threads"] == 1


def test_replaced_dir_keeps_the_old_folder_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replaced_dir(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("crash mid-stage")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with replaced_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_files_writes_all_or_nothing(tmp_path):
    write_files({tmp_path / "a": b"old a", tmp_path / "b": b"old b"})
    with pytest.raises(PipelineError, match="cannot write"):
        write_files({tmp_path / "a": b"new a", tmp_path / "a/below-a-file": b"x"})
    assert (tmp_path / "a").read_bytes() == b"old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_changed_settings_start_over(prepared_project, tmp_path):
    from stages.lib.modelfile import FORMAT

    folder = copy_of(prepared_project, tmp_path, "changed")
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
    write_files({path: json_bytes({"old": True})})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"half')
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(PipelineError, match="cannot write"):
        write_files({path / "below-a-file.json": b"{}"})


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


@pytest.mark.slow
def test_an_output_swapped_while_training_is_reported_and_replaced(trained_project, tmp_path):
    """A `dvc checkout` in another terminal while train runs: DVC cannot stop it, the stage says so and its
    own outputs (which dvc.lock will describe) replace the swapped ones."""
    folder = copy_of(trained_project, tmp_path, "swapped")
    write_params(folder, {"train": {"epochs": 2, "lr": 0.02}})
    process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=folder, text=True,
                               env=clean_env(PYTHONPATH=str(REPO), TUDUI_FAULT="sigstop@step=3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until_stopped(process.pid)
    (folder / "models/model.pt").write_bytes(b"another run's model")
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert "warning: models/model.pt changed while train ran" in stderr
    assert read_torch_file(folder / "models/model.pt")["params"]["train"]["lr"] == 0.02


def test_a_full_disk_during_training_is_one_line_and_changes_no_output(trained_project, tmp_path):
    """The checkpoint write refused by the disk (a file-size limit fails writes as a full disk does)."""
    import resource

    folder = copy_of(trained_project, tmp_path, "full-train")
    write_params(folder, {"train": {"lr": 0.02}})
    before = tracked_outputs(folder)

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=folder, env=clean_env(PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write .resume/") and last.endswith("checkpoint.pt: File too large"), last
    assert tracked_outputs(folder) == before
