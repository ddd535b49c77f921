"""Stage 1 — download: put the data set's raw files, checksum-verified, into data/raw/<dataset>/.

Sources are tried in order: folders or http(s) base URLs from `data.mirrors`, the folder an OS
package installed (Debian's dataset-fashion-mnist), then the official mirrors torchvision lists.
Every file is verified before it is moved into place, so data/raw never holds a partial or wrong file.
"""
from __future__ import annotations

import http.client
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from stages.datasets import IdxDataset, file_matches, get_dataset
from stages.errors import PipelineError, run
from stages.files import atomic_path
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


def download(dataset: IdxDataset, dest: Path, sources: list[str], timeout_s: float) -> dict[str, str]:
    """Fetch every file of `dataset` into `dest`; return {file name: source used}."""
    dest.mkdir(parents=True, exist_ok=True)
    return {name: fetch_file(dataset, name, md5, sources, dest, timeout_s) for name, md5 in dataset.files}


def main(args) -> None:
    params = load_params()
    dataset = get_dataset(params["data"]["dataset"])
    dest = RAW_DIR / dataset.name
    used = download(dataset, dest, sources_for(dataset, params["data"]["mirrors"]), params["data"]["timeout_s"])
    for name, source in used.items():
        print(f"{dest / name}  <- {source}")


if __name__ == "__main__":
    run(main, description=__doc__.splitlines()[0])
