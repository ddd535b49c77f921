"""Stage 1 — download: put the data set's raw files, checksum-verified, into data/raw/<dataset>/.

Sources are tried in order: folders or http(s) base URLs from `data.mirrors`, the folder an OS
package installed (Debian's dataset-fashion-mnist), then the official mirrors torchvision lists.
Every file is verified before it is moved into place, so data/raw never holds a partial or wrong file.
An image folder (`data.source`: a folder, a .zip/.tar.gz file or a URL of one) is copied or
downloaded, md5-checked when `data.md5` is set, and unpacked safely into data/raw/imagefolder/.
"""
from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from stages.archives import extract
from stages.datasets import IdxDataset, file_matches, get_dataset
from stages.errors import PipelineError, run
from stages.files import atomic_path, md5_file, replaced_dir
from stages.params import load_params

RAW_DIR = Path("data/raw")


def _copy_from(source: str, name: str, tmp: Path, timeout_s: float) -> None:
    """Copy `name` from a folder or base URL into `tmp`; raise OSError/ValueError on any failure."""
    if not source.startswith(("http://", "https://")):
        shutil.copyfile(Path(source) / name, tmp)
        return
    url = source.rstrip("/") + "/" + name
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as out:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
        size = out.tell()
    if expected is not None and int(expected) != size:
        raise ValueError(f"truncated: got {size} of {expected} bytes")


def _why(exc: Exception) -> str:
    """Why a source failed, in one short line whatever the server sent."""
    if isinstance(exc, urllib.error.HTTPError):
        reason = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, http.client.HTTPException):
        reason = f"bad HTTP response: {type(exc).__name__} {exc}"
    else:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return " ".join(str(reason).split())[:200]


def fetch_file(dataset: IdxDataset, name: str, md5: str, sources: list[str], dest: Path,
               timeout_s: float) -> str:
    """Get one verified file into `dest/name`; return the source it came from."""
    failures = []
    for source in sources:
        try:
            with atomic_path(dest / name) as tmp:
                _copy_from(source, name, tmp, timeout_s)
                if not file_matches(tmp, dataset, name, md5):
                    raise ValueError("checksum mismatch")
            return source
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
            failures.append(f"{source} ({_why(exc)})")
    raise PipelineError(
        f"could not get {name}; tried: {'; '.join(failures) or 'no sources'}. Put the official file in a "
        f"folder listed under data.mirrors in params.yaml, or apt-get install {dataset.debian_package} (Debian)")


def sources_for(dataset: IdxDataset, mirrors: list[str]) -> list[str]:
    """data.mirrors first, then the OS package's folder, then the official mirrors; each once."""
    return list(dict.fromkeys([*mirrors, *dataset.system_dirs(), *dataset.official_mirrors]))


def download(dataset: IdxDataset, dest: Path, sources: list[str], timeout_s: float,
             md5_override: str = "") -> dict[str, str]:
    """Fetch every file of `dataset` into `dest`; return {file name: source used}. `md5_override`
    replaces the official md5 of a one-file data set (a repacked mirror of the CIFAR-10 tarball)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = dataset.files
    if md5_override:
        if len(files) != 1:
            raise PipelineError(f"data.md5 applies to one-file data sets (cifar10, imagefolder), not {dataset.name}")
        files = [(files[0][0], md5_override)]
    return {name: fetch_file(dataset, name, md5, sources, dest, timeout_s) for name, md5 in files}


def fetch_image_folder(source: str, md5: str, dest: Path, timeout_s: float) -> str:
    """Copy a folder, or fetch (file or URL) and unpack an archive, into `dest`, which must not exist."""
    is_url = source.startswith(("http://", "https://"))
    if not is_url and not Path(source).exists():
        raise PipelineError(f"data.source {source!r} is neither a folder, a file nor an http(s) URL")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if Path(source).is_dir():
        shutil.copytree(source, dest)
        return source
    base, name = source.rstrip("/").rsplit("/", 1) if is_url else (str(Path(source).parent), Path(source).name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest.parent)
    os.close(fd)
    archive = Path(tmp)
    try:
        try:
            _copy_from(base, name, archive, timeout_s)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise PipelineError(f"could not get {source} ({_why(exc)}); download it by hand and set "
                                "data.source to the file or to the unpacked folder") from None
        if md5 and md5_file(archive) != md5:
            raise PipelineError(f"{source}: md5 {md5_file(archive)} does not match data.md5 {md5}")
        extract(archive, dest)
    finally:
        archive.unlink(missing_ok=True)  # only the unpacked images are kept
    return source


def main(args) -> None:
    params = load_params()
    cfg = params["data"]
    dataset = get_dataset(cfg["dataset"])
    dest = RAW_DIR / dataset.name
    with replaced_dir(RAW_DIR) as staging:  # data/raw stays as it was unless every file arrived and checked out
        if dataset.kind == "imagefolder":
            used = {str(dest): fetch_image_folder(cfg["source"], cfg["md5"], staging / dataset.name, cfg["timeout_s"])}
        else:
            used = download(dataset, staging / dataset.name, sources_for(dataset, cfg["mirrors"]), cfg["timeout_s"],
                            cfg["md5"])
    for name, source in used.items():
        print(f"{dest / name}  <- {source}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
