"""What each data set is: its files, their checksums, where copies live, and how to read them."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from stages.errors import PipelineError


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-style data set: four gzip'd idx files. torchvision's class keeps the official
    mirrors, file names, md5s and class names; we add what torchvision does not know."""

    name: str
    torchvision_class: str
    # md5 of each file's *uncompressed* bytes. Debian re-gzips the files (no name in the header), so
    # their .gz md5 differs from the official one while the data is identical.
    content_md5: dict
    debian_package: str | None = None
    default_system_dir: str | None = None
    kind = "idx"

    def _tv(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    @property
    def official_mirrors(self) -> list[str]:
        return list(self._tv().mirrors)

    @property
    def files(self) -> list[tuple[str, str]]:
        """[(file name, official md5 of the .gz)] in the order train images, train labels, test ..."""
        return [(name, md5) for name, md5 in self._tv().resources]

    @property
    def classes(self) -> list[str]:
        return list(self._tv().classes)

    def system_dirs(self) -> list[str]:
        """Folders where an OS package installed the files (`dpkg -L`), else the usual place."""
        found = []
        if not self.debian_package:
            return []
        if shutil.which("dpkg"):
            listing = subprocess.run(["dpkg", "-L", self.debian_package], capture_output=True, text=True)
            names = {name for name, _ in self.files}
            found = sorted({str(Path(p).parent) for p in listing.stdout.splitlines() if Path(p).name in names})
        return found or [self.default_system_dir]


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

MNIST = IdxDataset(name="mnist", torchvision_class="MNIST", content_md5={})


@dataclass(frozen=True)
class CifarDataset:
    """CIFAR-10, python version: one md5-checked tarball of pickled batches (data_batch_1..5,
    test_batch, batches.meta)."""

    name: str = "cifar10"
    torchvision_class: str = "CIFAR10"
    content_md5 = {}
    debian_package = None
    kind = "cifar"

    def _tv(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    @property
    def official_mirrors(self) -> list[str]:
        return [self._tv().url.rsplit("/", 1)[0] + "/"]

    @property
    def files(self) -> list[tuple[str, str]]:
        return [(self._tv().filename, self._tv().tgz_md5)]

    def system_dirs(self) -> list[str]:
        return []


CIFAR10 = CifarDataset()


@dataclass(frozen=True)
class ImageFolderDataset:
    """Any folder of class_name/*.jpg (with or without train/ and val/), or a zip/tar of one."""

    name: str = "imagefolder"
    debian_package = None
    kind = "imagefolder"


IMAGE_FOLDER = ImageFolderDataset()
DATASETS = {d.name: d for d in (FASHION_MNIST, MNIST, CIFAR10, IMAGE_FOLDER)}


def get_dataset(name: str):
    if name not in DATASETS:
        raise PipelineError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    return DATASETS[name]


def file_matches(path: Path, dataset: IdxDataset, name: str, md5: str) -> bool:
    """True if `path` holds the official file `name`: same .gz md5, or same uncompressed bytes."""
    digest = hashlib.md5(Path(path).read_bytes()).hexdigest()
    if digest == md5:
        return True
    try:
        with gzip.open(path, "rb") as f:
            return hashlib.md5(f.read()).hexdigest() == dataset.content_md5.get(name)
    except (OSError, EOFError, zlib.error):  # not gzip, truncated, or a corrupt deflate stream
        return False


def read_idx(path: Path):
    """Read a gzip'd idx file of unsigned bytes into a uint8 tensor shaped as its header says."""
    import torch

    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise PipelineError(f"{path} is not a readable gzip file ({exc}); run the download stage again") from exc
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
        raise PipelineError(f"{path.name} in the CIFAR-10 archive is not a CIFAR batch ({exc})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_cifar(archive: Path):
    """The python-version tarball -> ((train images N×3×32×32 uint8, labels), (test ...), class names)."""
    import numpy as np
    import torch

    from stages.archives import extract

    with tempfile.TemporaryDirectory(prefix=".cifar-", dir=Path(archive).parent) as tmp:
        folder = extract(archive, Path(tmp) / "x") / "cifar-10-batches-py"

        def load(names):
            batches = [_read_batch(folder / n) for n in names]
            try:
                images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
                labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
                return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)
            except (KeyError, ValueError) as exc:
                raise PipelineError(f"{archive}: a batch is not shaped like CIFAR-10 ({exc})") from None

        train = load([f"data_batch_{i}" for i in range(1, 6)])
        test = load(["test_batch"])
        classes = [str(c) for c in _read_batch(folder / "batches.meta")["label_names"]]
    return train, test, classes


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


def read_image_folder(root: Path, size: int):
    """Decode every image under the class folders to uint8 3×size×size (shorter side resized, center
    crop). Returns ({split: (images, labels)}, classes, skipped) where skipped lists unreadable files."""
    import torch

    from stages.images import load_image

    splits = find_image_splits(root)
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
                    images.append(load_image(path, 3, [size, size], resize="center_crop"))
                except PipelineError as exc:
                    skipped.append(str(exc))
                    continue
                labels.append(index)
                count += 1
            if count == 0 and (folder / name).is_dir():
                raise PipelineError(f"class folder {folder / name} has no readable images")
        if not images:
            raise PipelineError(f"{folder} has no readable images")
        out[split] = (torch.stack(images), torch.tensor(labels, dtype=torch.int64))
    return out, classes, skipped
