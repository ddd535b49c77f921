"""benchmarks/bench.py end to end on a tiny budget: every route really trains and the report is complete.
(The speed targets themselves are measured by `make bench`, never asserted in tests.)"""
import io
import json
import pickle
import shlex
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO, clean_env
from stages.lib.device import use_bf16
from stages.lib.params import ParamsError, read_yaml, validate

BENCH = str(REPO / "benchmarks/bench.py")


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, BENCH, *args], env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_benchmark_runs_every_route_with_seeds_and_writes_the_report(mirror, tmp_path):
    result = bench("--raw", str(mirror), "--device", "cpu", "--seeds", "2", "--epochs", "2", "--limit", "1000",
                   "--test-limit", "300", "--fast-epochs", "2", "--fast-short-epochs", "1",
                   "--set", "train.batch_size=32", "--set", "train.lr=0.05", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    summary = {s["route"]: s for s in report["summary"]}
    assert list(summary) == ["reference", "project", "fast-short", "fast"]  # cifar10 runs by default on CUDA only
    assert [summary[r]["epochs"] for r in summary] == [2, 2, 1, 2]
    for s in summary.values():
        assert s["seeds"] == [0, 1] and len(s["per_seed"]) == 2
        acc = s["test_accuracy"]
        assert acc["min"] <= acc["mean"] <= acc["max"] and acc["sd"] >= 0
        assert acc["mean"] == pytest.approx(sum(r["test_accuracy"] for r in s["per_seed"]) / 2)
        for run in s["per_seed"]:
            assert run["images_per_s"] > 0 and run["peak_rss_mb"] > 100 and len(run["accuracy_per_epoch"]) == run["epochs"]
            tested = run["accuracy_per_epoch"][1:] if s["route"] == "fast" else run["accuracy_per_epoch"]
            assert all(0 <= a <= 1 for a in tested)
            if s["route"] == "fast":  # the recipe's train.val_every: 0 tests after the last epoch only
                assert run["accuracy_per_epoch"][0] is None
    # two seeds are two different trainings (init, order, augmentation), on the same split
    assert report["raw"]["fast"][0]["epochs"] != report["raw"]["fast"][1]["epochs"]
    assert report["raw"]["fast"][0]["epochs"][0]["images"] == 1000  # --limit
    # 1,000 images, 2 epochs of 32 steps (the recipe's batch 256 would be 4 steps an epoch): well above chance (0.1)
    assert summary["fast"]["test_accuracy"]["min"] > 0.2
    evaluated = summary["fast"]["evaluate"]
    # each evaluated seed's test accuracy was measured by training's validation, in the precision it trained
    # in (bf16 on CPUs with native bf16, else fp32): the evaluate pass in that precision gives the same figure.
    # Seed by seed: with native bf16 every seed is evaluated, without it seed 0 only (emulated bf16 is slow)
    native = use_bf16("auto", torch.device("cpu"))
    trained_in = "bf16" if native else "fp32"
    assert summary["fast"]["evaluate_seeds"] == ([0, 1] if native else [0])
    for run in summary["fast"]["per_seed"]:
        if run["seed"] in summary["fast"]["evaluate_seeds"]:
            assert run["evaluate"][trained_in]["accuracy"] == pytest.approx(run["test_accuracy"]), run["seed"]
    assert abs(evaluated["bf16"]["accuracy"]["mean"] - evaluated["fp32"]["accuracy"]["mean"]) < 0.05
    assert set(report["checks"]) >= {"project/reference throughput", "project - reference test accuracy",
                                     "fast: test accuracy, mean of the seeds", "fast: test accuracy, worst seed",
                                     "fast: elapsed / reference elapsed", "evaluate: bf16 - fp32 test accuracy"}
    table = (tmp_path / "results.md").read_text()
    assert "| reference | 2 | 2 |" in table and "| fast | 2 | 2 |" in table and "fast seed 1: —, " in table
    assert "| bf16 |" in table


def learnable_cifar_batch(n, seed):
    """CIFAR-shaped images whose class shows whatever the flips and crops: class k has its own colour (+ noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    palette = np.array([[r, g, b] for r in (40, 200) for g in (40, 200) for b in (40, 120, 200)][:10], dtype=np.uint8)
    images = palette[labels][:, :, None, None] + rng.integers(0, 40, (n, 3, 32, 32), dtype=np.uint8)
    return {"labels": labels.tolist(), "data": images.reshape(n, 3072), "batch_label": f"batch {seed}"}


def make_learnable_cifar(path, per_batch):
    members = {f"cifar-10-batches-py/data_batch_{i}": learnable_cifar_batch(per_batch, i) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = learnable_cifar_batch(per_batch, 9)
    members["cifar-10-batches-py/batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_cifar10_route_on_the_gpu_path_runs_on_a_cpu(mirror, tmp_path):
    """The route `make bench DEVICE=cuda` adds, run on the CPU with a fabricated CIFAR-10 found through the
    mirror: the real data path (fetch from the mirror, md5, unpickle, split), the airbench net and its
    recipe, the data resident on the device and augmented there."""
    from stages.lib.files import md5_file

    mirror_dir = tmp_path / "mirror"
    mirror_dir.mkdir()
    make_learnable_cifar(mirror_dir / "cifar-10-python.tar.gz", per_batch=40)
    recipe = read_yaml(REPO / "benchmarks/cifar10_recipe.yaml")
    assert recipe["data.dataset"] == "cifar10" and recipe["model.name"] == "airbench"
    result = bench("--raw", str(mirror), "--device", "cpu", "--routes", "cifar10", "--seeds", "1",
                   "--cifar-mirror", str(mirror_dir), "--set", "preprocess.val_size=20", "--set", "train.epochs=2",
                   "--set", "train.batch_size=32", "--set", "train.lr=5e-2", "--set",
                   f"data.md5={md5_file(mirror_dir / 'cifar-10-python.tar.gz')}", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert f"cifar10: the real CIFAR-10 from {mirror_dir}" in result.stdout
    report = json.loads((tmp_path / "out/results.json").read_text())
    (cifar,) = report["summary"]
    assert cifar["route"] == "cifar10" and cifar["epochs"] == 2
    assert report["raw"]["cifar10"][0]["epochs"][0]["images"] == 200  # 5 × 40, the 20 validation images included
    assert cifar["test_accuracy"]["mean"] > 0.3  # chance: 0.1
    assert "cifar10: test accuracy and elapsed" in report["checks"]


def test_cifar10_route_is_skipped_with_a_note_without_a_copy(mirror, tmp_path):
    result = bench("--raw", str(mirror), "--device", "cpu", "--routes", "cifar10", "--cifar-mirror",
                   str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "cifar10 skipped: no CIFAR-10 copy reachable through" in result.stdout
    assert not (tmp_path / "out/results.json").exists()


def bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench as module

    return module


def test_docs_state_the_fast_recipe_exactly_as_the_preset(tmp_path):
    """The `dvc exp run` line in docs/benchmarks.md and `make fast-recipe` must be the recipe the benchmark
    measures: its -S flags, applied to params.yaml by the function `dvc exp run -S` calls, give exactly the
    params bench.py trains route fast with, and leave params.yaml's comments in place."""
    from dvc.utils.hydra import apply_overrides

    page = (REPO / "docs/benchmarks.md").read_text()
    line = next(line for line in page.splitlines() if line.startswith("dvc exp run -n fast-recipe"))
    printed = subprocess.run([sys.executable, BENCH, "--print-recipe"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == line.split(" ", 5)[5]
    longer = subprocess.run([sys.executable, BENCH, "--print-recipe", "--fast-epochs", "24"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert longer == printed.stdout.strip().replace("-S train.epochs=10", "-S train.epochs=24")

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    flags = shlex.split(line)[5:]
    assert flags[::2] == ["-S"] * (len(flags) // 2)
    apply_overrides(params, flags[1::2])
    by_dvc = validate(read_yaml(params))
    by_bench = bench_module().project_params("fast", None, by_dvc.seed, by_dvc.train.device)
    assert by_dvc.flat() == by_bench.flat()
    comments = [l for l in (REPO / "params.yaml").read_text().splitlines() if "#" in l]
    assert [l for l in params.read_text().splitlines() if "#" in l][:3] == comments[:3]
    assert sum("#" in l for l in params.read_text().splitlines()) == len(comments)


def test_set_values_are_read_as_yaml_1_2_as_dvc_reads_params(tmp_path):
    """`--set train.lr=1e-3` is the number 0.001, as `lr: 1e-3` in params.yaml and `dvc exp run -S` read
    it (YAML 1.1 made it the text '1e-3', which params refuse); a wrong key or value is one line."""
    bench = bench_module()
    params = bench.project_params("fast", None, 0, "cpu", ["train.lr=1e-3", "train.weight_decay=5e-4",
                                                           "data.mirrors=[/a, /b]", "train.nesterov=false"])
    assert (params.train.lr, params.train.weight_decay, params.data.mirrors) == (0.001, 0.0005, ["/a", "/b"])
    assert params.train.nesterov is False
    for bad, why in [("train.nesterov=yes", "train.nesterov"), ("train.lrr=1e-3", "did you mean 'lr'"),
                     ("train.lr", "expected KEY=VALUE"), ("seed.x=1", "not a section")]:
        with pytest.raises(ParamsError, match=why):
            bench.project_params("fast", None, 0, "cpu", [bad])
    # end to end: the option itself (the cifar10 route, skipped without a copy, runs nothing)
    ran = subprocess.run([sys.executable, BENCH, "--raw", str(tmp_path), "--device", "cpu", "--routes", "cifar10",
                          "--cifar-mirror", str(tmp_path / "none"), "--set", "train.lr=1e-3", "--out",
                          str(tmp_path / "out")], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    refused = subprocess.run([sys.executable, BENCH, "--raw", str(tmp_path), "--set", "train.lr=1e-3x"],
                             env=clean_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and refused.stderr.startswith("error: train.lr") \
        and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


@pytest.mark.parametrize("name", ["fast_recipe", "fast_short_recipe", "cifar10_recipe"])
def test_every_recipe_is_valid_params(name):
    bench = bench_module()
    route = {"fast_recipe": "fast", "fast_short_recipe": "fast-short", "cifar10_recipe": "cifar10"}[name]
    params = bench.project_params(route, None, 0, "cpu")
    recipe = bench.preset(route)
    assert {k: params.flat()[k] for k in recipe} == recipe


def test_the_recipe_is_chosen_by_machine_kind_and_results_go_to_its_folder(tmp_path, monkeypatch):
    """A machine kind (native bf16 or not, cores) picks <recipe>.<kind>.yaml where one exists, else the
    recipe; --print-recipe names the file it chose; the report's machine line has the CPU's flags."""
    bench = bench_module()
    kind = bench.machine_kind()
    assert kind.startswith("cpu-bf16-" if bench.native_bf16() else "cpu-") and kind.endswith("core")
    monkeypatch.setattr(bench, "RECIPES", tmp_path)
    (tmp_path / "fast_recipe.yaml").write_text("train.epochs: 9\n")
    assert bench.recipe_file("fast", "cpu-avx2-2core") == tmp_path / "fast_recipe.yaml"
    (tmp_path / "fast_recipe.cpu-avx2-2core.yaml").write_text("train.epochs: 5\n")
    assert bench.recipe_file("fast", "cpu-avx2-2core") == tmp_path / "fast_recipe.cpu-avx2-2core.yaml"
    assert bench.preset("fast", "cpu-avx2-2core") == {"train.epochs": 5}
    assert bench.preset("fast", "cpu-bf16-2core") == {"train.epochs": 9}
    printed = subprocess.run([sys.executable, BENCH, "--print-recipe"], capture_output=True, text=True, check=True)
    assert f"(kind {kind}, flags " in printed.stderr and "benchmarks/fast_recipe" in printed.stderr


def summary_of(route, accuracies, elapsed, cpu=None, reach=None):
    bench = bench_module()
    out = {"route": route, "test_accuracy": bench.spread(accuracies), "elapsed_seconds": bench.spread(elapsed),
           "seconds_to_reach": {"0.8680": None if reach is None else bench.spread(reach)}}
    if cpu:
        out["cpu_seconds"] = bench.spread(cpu)
    return out


def test_every_goal_is_printed_against_its_figure_met_or_missed():
    bench = bench_module()
    by_route = {"reference": summary_of("reference", [0.868, 0.868], [480, 484], cpu=[900, 900]),
                "fast-short": summary_of("fast-short", [0.88, 0.88], [14, 15], reach=[14, 15]),
                "fast": summary_of("fast", [0.9415, 0.9385], [230, 250], cpu=[470, 470]),
                "stretch": summary_of("stretch", [0.949, 0.95], [900, 1000])}
    checks = bench.checks_for(by_route, 0.868)
    assert checks["fast: test accuracy, mean of the seeds"].endswith("(target ≥ 94.00%): met")
    assert checks["fast: test accuracy, worst seed"] == "93.85% (target ≥ 93.80%): met"
    assert checks["fast: elapsed / reference elapsed"].endswith("target ≤ 0.5): met")
    assert checks["fast: CPU seconds / reference CPU seconds"].startswith("0.52 ") \
        and checks["fast: CPU seconds / reference CPU seconds"].endswith(": MISSED")
    assert checks["fast-short: time to the reference's mean final accuracy (86.80%) / reference elapsed"].endswith(": met")
    assert checks["stretch: test accuracy, mean of the seeds"] == "94.95% (target ≥ 95.00%): MISSED"
    assert checks["stretch: elapsed / reference elapsed"].endswith("target ≤ 2.0): met")
    gpu_goals = [v for k, v in checks.items() if k.startswith("GPU")]
    assert gpu_goals == ["unmeasured (no GPU in this run: make bench DEVICE=cuda on one)"]
    del by_route["stretch"]
    by_route["fast"]["images_per_s"] = bench.spread([160_000, 150_000])
    by_route["fast"]["seconds_to_reach"]["0.9400"] = bench.spread([4.0, 5.5])
    checks = bench.checks_for(by_route, 0.868, gpu=True)
    assert checks["stretch: ≥ 95.00% in ≤ 2× the reference's time"].startswith("not run")
    assert checks["GPU: fast images/s"] == "155,000 (target ≥ 150,000): met"
    assert checks["GPU: fast, elapsed to 94.00% test accuracy"] == "4.8 s (worst seed 5.5 s; target ≤ 5 s): MISSED"


def test_rewrite_report_recomputes_the_checks_from_the_saved_runs(tmp_path):
    def run(route, seed, accuracy, seconds):
        return {"route": route, "seed": seed, "peak_rss_mb": 500.0, "epochs": [
            {"epoch": 1, "train_seconds": seconds * 0.9, "elapsed_seconds": seconds, "cpu_seconds": seconds * 2,
             "test_accuracy": accuracy, "images": 1000}]}

    raw = {"reference": [run("reference", 0, 0.86, 100.0)],
           "fast": [run("fast", 0, 0.941, 40.0), run("fast", 1, 0.939, 45.0)]}
    (tmp_path / "results.json").write_text(json.dumps({"machine": "a CPU, 2 cores, 2 threads, device cpu",
                                                       "notes": [], "checks": {}, "raw": raw}))
    result = bench("--rewrite-report", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["raw"] == raw and report["machine"] == "a CPU, 2 cores, 2 threads, device cpu"
    assert report["checks"]["fast: test accuracy, mean of the seeds"] == "94.00% (target ≥ 94.00%): met"
    assert report["checks"]["fast: elapsed / reference elapsed"].startswith("0.42 ")
    assert "| fast | 2 | 1 |" in (tmp_path / "results.md").read_text() and "Checks:" in result.stdout


def test_levers_sizes_scale_the_training_batches_epoch_by_epoch(monkeypatch):
    """`benchmarks/levers.py --sizes 20,28` (progressive resizing, a row of levers.md): the loader's first pass
    gives 20×20 training batches, the later ones the stored 28×28; validation batches keep their size."""
    bench_module()
    import levers
    from stages.lib import loader

    monkeypatch.setattr(loader.BatchLoader, "__iter__", loader.BatchLoader.__iter__)  # undone after the test
    levers.patch_sizes([20, 28])
    images, labels = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8), torch.arange(6)
    train = loader.BatchLoader(images, labels, 4, lambda x: x.float(), seed=0, flip=True)
    assert [x.shape[-2:] for x, _ in train] == [(20, 20)] * 2
    assert [x.shape[-2:] for x, _ in train] == [(28, 28)] * 2
    assert [x.shape[-2:] for x, _ in loader.BatchLoader(images, labels, 4, lambda x: x.float())] == [(28, 28)] * 2


def test_levers_net_options_go_over_the_recipe_nets_own():
    """`benchmarks/levers.py --net-options '{"widths": [...]}'` trains the recipe's net with those options over its
    own (the width and identity-init rows of levers.md), and nothing else of it changes."""
    bench_module()  # puts benchmarks/ on sys.path
    import levers
    from stages.lib import nets

    saved = nets.MODELS["fast_cnn6"]
    try:
        levers.patch_net_options("fast_cnn6", {"widths": [8, 16, 32], "identity_init": False})
        config = nets.model_config("fast_cnn6", [1, 28, 28], 10)
        assert (config["widths"], config["convs"], config["pool"], config["identity_init"]) == \
            ([8, 16, 32], [2, 2, 2], "first", False)
        assert nets.build_model(config)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    finally:
        nets.MODELS["fast_cnn6"] = saved
    assert nets.model_config("fast_cnn6", [1, 28, 28], 10)["widths"] == [32, 64, 128]


def test_levers_whiten_trained_trains_the_whitened_first_conv(monkeypatch):
    """`benchmarks/levers.py --whiten-trained` (a row of levers.md): model.whiten's filters, then trained on."""
    bench_module()
    import levers
    from stages.lib import nets, training

    monkeypatch.setattr(training, "whiten_first_conv", training.whiten_first_conv)  # undone after the test
    levers.patch_whiten_trained()
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = nets.build_model(nets.model_config("fast_cnn6", [1, 28, 28], 10, tta_flip=True))
    training.whiten_first_conv(model, "fast_cnn6", images)
    filters = nets.whitening_filters(images)
    assert torch.equal(model.net.features[0].weight[:18], torch.cat([filters, -filters]))
    assert model.net.features[0].weight.requires_grad
