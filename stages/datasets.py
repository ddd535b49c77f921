"""What each data set is: its files, their checksums, where copies live, and how to read them."""
from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
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
    debian_package: str
    default_system_dir: str

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

DATASETS = {d.name: d for d in (FASHION_MNIST,)}


def get_dataset(name: str) -> IdxDataset:
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
