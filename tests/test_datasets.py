"""MNIST, CIFAR-10 and image folders through the real download and preprocess code, on archives these
tests fabricate with the real layout and serve from 127.0.0.1 (the real hosts are not reachable here)."""
import csv
import gzip
import hashlib
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_params
from stages import download, preprocess
from stages.lib.prepared import load_meta, load_split
from stages.lib.datasets import CIFAR10, MNIST
from stages.lib.errors import PipelineError


def run_stages(folder, monkeypatch, overrides):
    write_params(folder, overrides)
    monkeypatch.chdir(folder)
    download.main(None)
    preprocess.main(None)
    return load_meta(folder / "data/prepared")


# --- CIFAR-10 --------------------------------------------------------------------------------------

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {"batch_label": f"batch {seed}", "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def make_cifar(path, per_batch=20, hostile=False):
    """cifar-10-python.tar.gz with the real member names and pickled dicts, made small."""
    members = {f"cifar-10-batches-py/data_batch_{i}": cifar_batch(per_batch, i) for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = cifar_batch(per_batch, 9)
    members["cifar-10-batches-py/batches.meta"] = {"label_names": CIFAR_CLASSES, "num_vis": 3072}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = pickle.dumps(obj, protocol=2)
            if hostile and name.endswith("test_batch"):
                data = b"cos\nsystem\n(S'touch /tmp/cifar-pwned'\ntR."
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_cifar10_download_and_preprocess(tmp_path, monkeypatch, serve_folder):
    www = tmp_path / "www"
    www.mkdir()
    archive = make_cifar(www / "cifar-10-python.tar.gz")
    url = serve_folder(www)
    project = tmp_path / "project"
    project.mkdir()
    meta = run_stages(project, monkeypatch, {"data": {"dataset": "cifar10", "mirrors": [url], "md5": md5(archive)},
                                             "preprocess": {"val_size": 10, "max_train": 0}})
    assert meta["classes"] == CIFAR_CLASSES and meta["input_shape"] == [3, 32, 32]
    assert meta["counts"] == {"train": 90, "val": 10, "test": 20}
    images, labels = load_split("test", project / "data/prepared")
    expected = cifar_batch(20, 9)
    assert torch.equal(images, torch.from_numpy(expected["data"].reshape(20, 3, 32, 32)))
    assert labels.tolist() == expected["labels"]
    assert sorted(p.name for p in (project / "data/raw/cifar10").iterdir()) == ["cifar-10-python.tar.gz"]


def test_cifar10_checksum_is_enforced(tmp_path, monkeypatch, serve_folder):
    www = tmp_path / "www"
    www.mkdir()
    make_cifar(www / "cifar-10-python.tar.gz")
    write_params(tmp_path, {"data": {"dataset": "cifar10", "mirrors": [serve_folder(www)]}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(type(CIFAR10), "official_mirrors", property(lambda self: []))
    with pytest.raises(PipelineError, match="checksum mismatch"):  # the official md5 of the real tarball
        download.main(None)
    assert not (tmp_path / "data/raw").exists()  # nothing half-downloaded is kept


def test_hostile_cifar_pickle_is_refused(tmp_path, monkeypatch):
    raw = tmp_path / "data/raw/cifar10"
    raw.mkdir(parents=True)
    make_cifar(raw / "cifar-10-python.tar.gz", hostile=True)
    write_params(tmp_path, {"data": {"dataset": "cifar10"}, "preprocess": {"val_size": 10}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match="refused to load"):
        preprocess.main(None)
    assert not (tmp_path / "data/prepared").exists()
    import os
    assert not os.path.exists("/tmp/cifar-pwned")


def test_cifar10_offline_fails_fast_naming_what_to_do(tmp_path, monkeypatch):
    write_params(tmp_path, {"data": {"dataset": "cifar10", "mirrors": [], "timeout_s": 2.0}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(type(CIFAR10), "official_mirrors",
                        property(lambda self: ["http://127.0.0.1:9/"]))  # discard port: refused at once
    with pytest.raises(PipelineError) as info:
        download.main(None)
    assert "cifar-10-python.tar.gz" in str(info.value) and "data.mirrors" in str(info.value)


# --- MNIST -----------------------------------------------------------------------------------------

def idx_bytes(array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def test_mnist_preprocess_and_official_checksums(tmp_path, monkeypatch, serve_folder):
    rng = np.random.default_rng(0)
    www = tmp_path / "www"
    www.mkdir()
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (60, 28, 28)),
             "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 60),
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 20)}
    for name, array in files.items():
        (www / name).write_bytes(idx_bytes(array))
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, {"data": {"dataset": "mnist", "mirrors": [serve_folder(www)]}})
    monkeypatch.chdir(project)
    monkeypatch.setattr(type(MNIST), "official_mirrors", property(lambda self: []))
    with pytest.raises(PipelineError, match="checksum mismatch"):  # fabricated files are not MNIST
        download.main(None)

    raw = project / "data/raw/mnist"
    raw.mkdir(parents=True)
    for name in files:
        (raw / name).write_bytes((www / name).read_bytes())
    write_params(project, {"data": {"dataset": "mnist"}, "preprocess": {"val_size": 10}})
    preprocess.main(None)
    meta = load_meta(project / "data/prepared")
    assert meta["classes"][0] == "0 - zero" and meta["input_shape"] == [1, 32, 32]
    assert meta["counts"] == {"train": 50, "val": 10, "test": 20}


# --- image folders (hymenoptera ants/bees) ---------------------------------------------------------

def jpeg(color, size=(80, 60)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_hymenoptera(path):
    """hymenoptera_data.zip: train/{ants,bees}, val/{ants,bees}, plus a corrupt JPEG and an empty file."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", 6), ("val", 3)):
            for cls, color in (("ants", (200, 40, 40)), ("bees", (240, 220, 30))):
                for i in range(n):
                    zf.writestr(f"hymenoptera_data/{split}/{cls}/{i}.jpg", jpeg(color))
        zf.writestr("hymenoptera_data/train/ants/broken.jpg", jpeg((1, 2, 3))[:200])
        zf.writestr("hymenoptera_data/train/bees/empty.jpg", b"")
    return path


def test_hymenoptera_zip_from_a_url(tmp_path, monkeypatch, serve_folder):
    www = tmp_path / "www"
    www.mkdir()
    archive = make_hymenoptera(www / "hymenoptera_data.zip")
    url = serve_folder(www) + "/hymenoptera_data.zip"
    project = tmp_path / "project"
    project.mkdir()
    meta = run_stages(project, monkeypatch, {"data": {"dataset": "imagefolder", "source": url, "md5": md5(archive)},
                                             "preprocess": {"val_size": 2, "image_size": 32}})
    assert meta["classes"] == ["ants", "bees"] and meta["input_shape"] == [3, 32, 32]
    assert meta["counts"] == {"train": 10, "val": 2, "test": 6}
    assert meta["skipped_files"]["count"] == 2
    assert meta["input"]["resize"] == "center_crop"
    images, labels = load_split("test", project / "data/prepared")
    ants = images[labels == 0].float().mean((0, 2, 3))
    assert ants[0] > 150 and ants[2] < 100  # red stays red: channels are RGB in order
    assert not any(p.name.startswith(".") for p in (project / "data/raw").iterdir())

    write_params(project, {"data": {"dataset": "imagefolder", "source": url, "md5": "0" * 32}})
    with pytest.raises(PipelineError, match="does not match data.md5"):
        download.main(None)


def test_single_folder_is_split_with_the_seed(tmp_path, monkeypatch):
    source = tmp_path / "photos"
    for cls in ("cats", "dogs", "fish"):
        (source / cls).mkdir(parents=True)
        for i in range(5):
            (source / cls / f"{i}.jpg").write_bytes(jpeg((i * 40, 100, 50)))
    (source / "dogs" / "notes.txt").write_text("not an image")
    project = tmp_path / "project"
    project.mkdir()
    meta = run_stages(project, monkeypatch, {"data": {"dataset": "imagefolder", "source": str(source)},
                                             "preprocess": {"val_size": 3, "test_size": 3, "image_size": 16}})
    assert meta["classes"] == ["cats", "dogs", "fish"] and meta["counts"] == {"train": 9, "val": 3, "test": 3}
    assert meta["skipped_files"]["count"] == 1 and "notes.txt" in meta["skipped_files"]["first"][0]

    write_params(project, {"data": {"dataset": "imagefolder", "source": str(source)},
                           "preprocess": {"val_size": 3, "test_size": 0, "image_size": 16}})
    with pytest.raises(PipelineError, match="set preprocess.test_size"):
        preprocess.main(None)


@pytest.mark.parametrize("layout, message", [
    ({"ants": 2}, "needs at least two class folders"),
    ({"ants": 2, "bees": 0}, "has no readable images"),
])
def test_image_folder_errors(tmp_path, monkeypatch, layout, message):
    source = tmp_path / "data_in"
    for cls, n in layout.items():
        (source / cls).mkdir(parents=True)
        for i in range(n):
            (source / cls / f"{i}.jpg").write_bytes(jpeg((10, 20, 30)))
    project = tmp_path / "project"
    project.mkdir()
    with pytest.raises(PipelineError, match=message):
        run_stages(project, monkeypatch, {"data": {"dataset": "imagefolder", "source": str(source)},
                                          "preprocess": {"val_size": 1, "test_size": 1, "image_size": 16}})
    assert not (project / "data/prepared").exists()


@pytest.mark.slow
def test_ants_and_bees_with_resnet18_through_every_stage(tmp_path, serve_folder):
    """One param switch and the whole chain runs: download -> preprocess -> train -> evaluate -> export ->
    predict, on RGB photos with a torchvision model."""
    from conftest import run_stage

    www = tmp_path / "www"
    www.mkdir()
    make_hymenoptera(www / "hymenoptera_data.zip")
    project = tmp_path / "project"
    project.mkdir()
    write_params(project, {"data": {"dataset": "imagefolder", "source": serve_folder(www) + "/hymenoptera_data.zip"},
                           "preprocess": {"val_size": 2, "image_size": 32}, "model": {"name": "resnet18"},
                           "train": {"batch_size": 4, "augment_crop": 4, "augment_flip": True},
                           "export": {"onnx_check_images": 4}})
    for stage in ("download", "preprocess", "train", "evaluate", "export"):
        result = run_stage(project, stage)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
    ckpt = torch.load(project / "models/model.pt", weights_only=True)
    assert ckpt["model"]["name"] == "resnet18" and ckpt["classes"] == ["ants", "bees"]
    assert ckpt["input"] == {"channels": 3, "size": [32, 32], "pad_to": [32, 32], "resize": "center_crop"}
    per_class = list(csv.DictReader((project / "metrics/per_class.csv").open()))
    assert [row["class"] for row in per_class] == ["ants", "bees"] and sum(int(r["images"]) for r in per_class) == 6
    assert json.loads((project / "metrics/export.json").read_text())["onnx_max_abs_diff"] < 1e-4
    assert "center-cropped" in (project / "models/export/MODEL_CARD.md").read_text()

    (tmp_path / "bee.jpg").write_bytes(jpeg((240, 220, 30), size=(120, 90)))
    result = run_stage(project, "tools.predict", "--json", str(tmp_path / "bee.jpg"))
    assert result.returncode == 0, result.stderr
    (answer,) = json.loads(result.stdout)
    assert {p["class"] for p in answer["top"]} == {"ants", "bees"}
