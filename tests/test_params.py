"""params.yaml checking: every bad value is one clear line, raised before any work is done."""
from pathlib import Path

import pytest
import yaml

from conftest import REPO, raw_params, run_stage, write_params
from stages.lib.params import ParamsError, flatten, load_params, validate
from tools.check import CHOICES


def test_check_refuses_an_unknown_top_level_key_that_no_stage_reads(tmp_path):
    """`dvc repro` reruns no stage when only an unread key changed; `python -m tools.check` (run first by
    make run) reads the whole file."""
    assert run_stage(REPO, "tools.check").returncode == 0
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text() + "sead: 1\n")
    result = run_stage(tmp_path, "tools.check")
    assert result.returncode == 2 and result.stderr.strip() == "error: unknown key sead; did you mean 'seed'?"


def test_committed_params_are_valid():
    params = load_params(REPO / "params.yaml", CHOICES)
    assert params.train.lr == 0.01 and params.train.batch_size == 64
    assert params.train.epochs == 10 and params.model.name == "cifar10_quick"
    assert params.flat()["train.lr"] == 0.01


@pytest.mark.parametrize("overrides, message", [
    ({"train": {"lrr": 0.1}}, "unknown key train.lrr; did you mean 'lr'?"),
    ({"trian": {}}, "unknown key trian; did you mean 'train'?"),
    ({"train": {"lr": "1e-3"}}, "train.lr must be a number, got str '1e-3' (a quoted number is text in YAML"),
    ({"train": {"lr": "fast"}}, "train.lr must be a number, got str 'fast'"),
    ({"train": {"lr": -0.1}}, "train.lr must be > 0, got -0.1"),
    ({"train": {"lr": 0}}, "train.lr must be > 0"),
    ({"train": {"epochs": 0}}, "train.epochs must be >= 1, got 0"),
    ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
    ({"train": {"batch_size": True}}, "train.batch_size must be an integer, got bool"),
    ({"train": {"device": "tpu"}}, "train.device must be one of auto, cpu, cuda or cuda:N"),
    ({"data": {"dataset": "imagenet"}}, "data.dataset must be one of fashion_mnist, mnist, cifar10, imagefolder; got 'imagenet'"),
    ({"model": {"name": "vgg99"}}, "model.name must be one of cifar10_quick, fast_cnn, fast_cnn6, fast_cnn_small, airbench, vgg16, resnet18; got 'vgg99'"),
    ({"data": {"mirrors": "/tmp"}}, "data.mirrors must be a list"),
    ({"data": {"mirrors": ["/tmp", ""]}}, "data.mirrors.1 must be a non-empty string"),
    ({"train": {"device": "cuda:x"}}, "train.device must be one of auto, cpu, cuda or cuda:N; got 'cuda:x'"),
    ({"tracking": {"uri": "http://me:secret@host:5000"}}, "tracking.uri must not hold credentials"),
    ({"preprocess": {"val_size": -1}}, "preprocess.val_size must be >= 1"),
])
def test_bad_values_are_named_with_what_is_allowed(overrides, message):
    with pytest.raises(ParamsError) as info:
        validate(raw_params(overrides), CHOICES)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"freeze_backbone": True}}, "model.freeze_backbone: true needs model.pretrained: true"),
    ({"data": {"dataset": "imagefolder"}}, "data.dataset imagefolder needs data.source"),
])
def test_combinations_that_cannot_work(tmp_path, overrides, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params(overrides)))
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")


def test_missing_key_and_non_mapping():
    params = raw_params()
    del params["train"]["lr"]
    with pytest.raises(ParamsError, match="missing key train.lr"):
        validate(params)
    with pytest.raises(ParamsError, match="train must be a mapping"):
        validate({**raw_params(), "train": [1, 2]})


def test_integers_are_accepted_where_floats_are_expected():
    params = validate(raw_params({"train": {"lr": 1}}))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_unreadable_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_flatten():
    assert flatten({"seed": 0, "train": {"lr": 0.1}}) == {"seed": 0, "train.lr": 0.1}


def test_yaml_is_read_as_dvc_reads_it(tmp_path):
    """YAML 1.2, like DVC: 1e-3 is a number (YAML 1.1 readers such as PyYAML see the text '1e-3')."""
    write_params(tmp_path)
    text = (tmp_path / "params.yaml").read_text().replace("lr: 0.01", "lr: 1e-3")
    (tmp_path / "params.yaml").write_text(text)
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"
    assert load_params(tmp_path / "params.yaml").train.lr == 0.001


@pytest.mark.parametrize("stage", ["download", "train"])
def test_stage_refuses_bad_params_before_touching_anything(tmp_path, stage):
    write_params(tmp_path)
    text = (tmp_path / "params.yaml").read_text().replace("lr: 0.01", "lr: '1e-2'")
    (tmp_path / "params.yaml").write_text(text)
    result = run_stage(tmp_path, stage)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.lr must be a number, got str '1e-2' (a quoted number is text in YAML: remove the quotes)"]
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["params.yaml"]
