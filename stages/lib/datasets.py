"""The data sets, one class each: where its files come from and how they are checked (`fetch`, run by the
download stage) and how they become images and labels (`read`, run by preprocess). Adding a data set is
one entry in DATASETS plus its test; params.yaml's data.dataset accepts exactly these names.
"""
from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.lib.archives import extract
from stages.lib.errors import PipelineError, one_line
from stages.lib.sources import fetch_file, fetch_source, is_url
from stages.lib.files import md5_file


@dataclass
class Raw:
    """What `read` returns: the images as the data set stores them, before preprocess splits and pads them."""
    train: tuple[torch.Tensor, torch.Tensor]               # uint8 N×C×H×W (or N×H×W) images, int labels
    test: tuple[torch.Tensor, torch.Tensor] | None         # None: preprocess carves preprocess.test_size out of train
    classes: list[str]
    resize: str = "stretch"     # how predict fits other images to this size: stretch | center_crop
    skipped: list[str] = field(default_factory=list)       # unreadable files, one line each


def _torchvision_dataset(name: str):
    import torchvision.datasets  # its class knows the official mirrors, file names, md5s and class names

    return getattr(torchvision.datasets, name)


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-style data set: four gzip'd idx files (train images, train labels, test images, test labels)."""

    name: str
    torchvision_class: str
    # md5 of each file's *uncompressed* bytes. Debian re-gzips the files (no name in the header), so
    # their .gz md5 differs from the official one while the data is identical.
    content_md5: dict = field(default_factory=dict)
    debian_package: str | None = None
    default_system_dir: str | None = None

    @property
    def official_mirrors(self) -> list[str]:
        return list(_torchvision_dataset(self.torchvision_class).mirrors)

    @property
    def files(self) -> list[tuple[str, str]]:
        """[(file name, official md5 of the .gz)] in the order train images, train labels, test ..."""
        return [(name, md5) for name, md5 in _torchvision_dataset(self.torchvision_class).resources]

    def system_dirs(self) -> list[str]:
        """Folders where an OS package installed the files (`dpkg -L`), else the usual place."""
        if not self.debian_package:
            return []
        found = []
        if shutil.which("dpkg"):
            listing = subprocess.run(["dpkg", "-L", self.debian_package], capture_output=True, text=True)
            names = {name for name, _ in self.files}
            found = sorted({str(Path(p).parent) for p in listing.stdout.splitlines() if Path(p).name in names})
        return found or [self.default_system_dir]

    def sources(self, mirrors: list[str]) -> list[str]:
        """data.mirrors first, then the OS package's folder, then the official mirrors; each once."""
        return list(dict.fromkeys([*mirrors, *self.system_dirs(), *self.official_mirrors]))

    def file_matches(self, path: Path, name: str, md5: str) -> bool:
        """True if `path` holds the official file `name`: same .gz md5, or same uncompressed bytes."""
        if md5_file(path) == md5:
            return True
        try:
            with gzip.open(path, "rb") as f:
                return hashlib.md5(f.read()).hexdigest() == self.content_md5.get(name)
        except (OSError, EOFError, zlib.error):  # not gzip, truncated, or a corrupt deflate stream
            return False

    def fetch(self, data, dest: Path) -> dict[str, str]:
        """Every file, verified, into `dest` from data.mirrors and the usual places; {file name: source used}."""
        if data.md5:
            raise PipelineError(f"data.md5 applies to one-file data sets (cifar10, imagefolder), not {self.name}")
        return self.download(dest, self.sources(data.mirrors), data.timeout_s)

    def download(self, dest: Path, sources: list[str], timeout_s: float) -> dict[str, str]:
        dest.mkdir(parents=True, exist_ok=True)
        return {name: self.fetch_file(name, sources, dest, timeout_s) for name, _ in self.files}

    def fetch_file(self, name: str, sources: list[str], dest: Path, timeout_s: float) -> str:
        """One file from the first of `sources` that has it intact; returns that source."""
        md5 = dict(self.files)[name]
        hint = "Put the official file in a folder listed under data.mirrors in params.yaml" + (
            f", or apt-get install {self.debian_package} (Debian)" if self.debian_package else "")
        return fetch_file(name, sources, dest, timeout_s, lambda path: self.file_matches(path, name, md5), hint)

    def read(self, raw: Path, preprocess) -> Raw:
        names = [name for name, _ in self.files]
        missing = [n for n in names if not (raw / n).exists()]
        if missing:
            raise PipelineError(f"{raw} lacks {', '.join(missing)}; run the download stage first")
        train_x, train_y, test_x, test_y = (read_idx(raw / n) for n in names)
        return Raw((train_x, train_y), (test_x, test_y), list(_torchvision_dataset(self.torchvision_class).classes))


def read_idx(path: Path) -> torch.Tensor:
    """Read a gzip'd idx file of unsigned bytes into a uint8 tensor shaped as its header says."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path} is not a readable gzip file ({one_line(exc)}); run the download stage again") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PipelineError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if len(data) != header + count:
        raise PipelineError(f"{path}: header says {dims} ({count} bytes) but holds {len(data) - header}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what they contain (numpy arrays), never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise PipelineError(f"the CIFAR-10 archive lacks {path.name}") from None
    except Exception as exc:  # a damaged or hostile pickle raises almost anything
        raise PipelineError(f"{path.name} in the CIFAR-10 archive is not a CIFAR batch ({one_line(exc)})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


@dataclass(frozen=True)
class CifarDataset:
    """CIFAR-10, python version: one md5-checked tarball of pickled batches (data_batch_1..5,
    test_batch, batches.meta)."""

    name: str = "cifar10"
    torchvision_class: str = "CIFAR10"

    @property
    def official_mirrors(self) -> list[str]:
        return [_torchvision_dataset(self.torchvision_class).url.rsplit("/", 1)[0] + "/"]

    @property
    def files(self) -> list[tuple[str, str]]:
        tv = _torchvision_dataset(self.torchvision_class)
        return [(tv.filename, tv.tgz_md5)]

    def fetch(self, data, dest: Path) -> dict[str, str]:
        """The tarball, md5-checked (data.md5 replaces the official md5 for a repacked copy)."""
        dest.mkdir(parents=True, exist_ok=True)
        (name, md5), = self.files
        md5 = data.md5 or md5
        sources = list(dict.fromkeys([*data.mirrors, *self.official_mirrors]))
        hint = "Put the official file in a folder listed under data.mirrors in params.yaml"
        return {name: fetch_file(name, sources, dest, data.timeout_s, lambda path: md5_file(path) == md5, hint)}

    def read(self, raw: Path, preprocess) -> Raw:
        """The tarball -> train (50,000) and test (10,000) images of 3×32×32, unpacked safely."""
        import numpy as np

        (name, _), = self.files
        archive = raw / name
        if not archive.exists():
            raise PipelineError(f"{raw} lacks {name}; run the download stage first")
        with tempfile.TemporaryDirectory(prefix=".cifar-", dir=raw) as tmp:
            folder = extract(archive, Path(tmp) / "x") / "cifar-10-batches-py"

            def load(names):
                batches = [_read_batch(folder / n) for n in names]
                try:
                    images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
                    labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
                    return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
                except (KeyError, ValueError) as exc:
                    raise PipelineError(f"{archive}: a batch is not shaped like CIFAR-10 ({one_line(exc)})") from None

            train = load([f"data_batch_{i}" for i in range(1, 6)])
            test = load(["test_batch"])
            classes = [str(c) for c in _read_batch(folder / "batches.meta")["label_names"]]
        return Raw(train, test, classes)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_image_splits(root: Path) -> dict:
    """{"train": folder, "test": folder or None} of an image-folder data set: `train/` with `val/` or
    `test/` (at the root or one folder down, as in hymenoptera_data/), else one folder of classes."""
    candidates = [root, *_class_folders(root)] if root.is_dir() else []
    for folder in candidates:
        if (folder / "train").is_dir():
            test = next((folder / n for n in ("val", "test") if (folder / n).is_dir()), None)
            return {"train": folder / "train", "test": test}
    subfolders = _class_folders(root) if root.is_dir() else []
    if len(subfolders) == 1 and _class_folders(subfolders[0]):
        return {"train": subfolders[0], "test": None}
    return {"train": root, "test": None}


@dataclass(frozen=True)
class ImageFolderDataset:
    """Any folder of class_name/*.jpg (with or without train/ and val/), or a zip/tar of one, at
    data.source (a path or an http(s) URL), decoded to RGB at preprocess.image_size."""

    name: str = "imagefolder"

    def fetch(self, data, dest: Path) -> dict[str, str]:
        """Copy the folder, or fetch the archive (md5-checked when data.md5 is set) and unpack it safely."""
        source = data.source
        if not is_url(source) and Path(source).is_dir():
            shutil.copytree(source, dest)
            return {"": source}
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
            archive = Path(tmp) / "archive"  # only the unpacked images are kept
            fetch_source(source, archive, data.timeout_s)
            if data.md5 and md5_file(archive) != data.md5:
                raise PipelineError(f"{source}: md5 {md5_file(archive)} does not match data.md5 {data.md5}")
            extract(archive, dest)
        return {"": source}

    def read(self, raw: Path, preprocess) -> Raw:
        """Every image under the class folders as uint8 3×S×S (S = preprocess.image_size: shorter side
        resized, center crop); unreadable files are skipped and listed."""
        from stages.lib.images import ImageError, read_image_file

        if not raw.is_dir():
            raise PipelineError(f"{raw} not found; run the download stage first")
        splits = find_image_splits(raw)
        classes = [p.name for p in _class_folders(splits["train"])]
        if len(classes) < 2:
            raise PipelineError(f"{splits['train']} needs at least two class folders (class_name/*.jpg); "
                                f"found {classes or 'none'}")
        out, skipped = {}, []
        for split, folder in splits.items():
            if folder is None:
                out[split] = None
                continue
            extra = sorted(set(p.name for p in _class_folders(folder)) - set(classes))
            if extra:
                raise PipelineError(f"{folder} has classes missing from {splits['train']}: {', '.join(extra)}")
            images, labels = [], []
            for index, name in enumerate(classes):
                count = 0
                for path in sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith(".")):
                    try:
                        images.append(torch.from_numpy(read_image_file(path, 3, [preprocess.image_size] * 2, resize="center_crop")))
                    except ImageError as exc:
                        skipped.append(str(exc))
                        continue
                    labels.append(index)
                    count += 1
                if count == 0 and (folder / name).is_dir():
                    raise PipelineError(f"class folder {folder / name} has no readable images")
            if not images:
                raise PipelineError(f"{folder} has no readable images")
            out[split] = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
        return Raw(out["train"], out["test"], classes, resize="center_crop", skipped=skipped)


FASHION_MNIST = IdxDataset(
    name="fashion_mnist",
    torchvision_class="FashionMNIST",
    content_md5={
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    debian_package="dataset-fashion-mnist",
    default_system_dir="/usr/share/datasets/fashion-mnist",
)
MNIST = IdxDataset(name="mnist", torchvision_class="MNIST")
CIFAR10 = CifarDataset()
IMAGE_FOLDER = ImageFolderDataset()

DATASETS = {d.name: d for d in (FASHION_MNIST, MNIST, CIFAR10, IMAGE_FOLDER)}
