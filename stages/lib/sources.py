"""Getting a file from a folder or an http(s) URL, verified before it is kept: the data sets' fetching."""
from __future__ import annotations

import http.client
import shutil
import urllib.request
from pathlib import Path
from typing import Callable

from stages.lib.errors import PipelineError, one_line
from stages.lib.files import atomic_path

FAILURES = (OSError, ValueError, http.client.HTTPException)  # URLError and HTTPError are OSErrors


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def copy_from(source: str, name: str, target: Path, timeout_s: float) -> None:
    """Copy `name` from a folder or base URL into `target`; raises one of FAILURES on any failure."""
    if not is_url(source):
        shutil.copyfile(Path(source) / name, target)
        return
    url = source.rstrip("/") + "/" + name
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:
        expected = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
        size = out.tell()
    if expected is not None and int(expected) != size:
        raise ValueError(f"truncated: got {size} of {expected} bytes")


def fetch_file(name: str, sources: list[str], dest: Path, timeout_s: float, verify: Callable[[Path], bool],
               hint: str) -> str:
    """Get `name` from the first source whose copy passes `verify` into `dest/name`; return that source.
    Nothing is left in `dest` when every source fails: the PipelineError names each one and why, then `hint`."""
    failures = []
    for source in sources:
        try:
            with atomic_path(dest / name) as tmp:
                copy_from(source, name, tmp, timeout_s)
                if not verify(tmp):
                    raise ValueError("checksum mismatch")
            return source
        except FAILURES as exc:
            failures.append(f"{source} ({one_line(exc, 200)})")
    raise PipelineError(f"could not get {name}; tried: {'; '.join(failures) or 'no sources'}. {hint}")


def fetch_source(source: str, target: Path, timeout_s: float) -> None:
    """Copy one file given as a path or an http(s) URL to `target` (data.source)."""
    if not is_url(source) and not Path(source).exists():
        raise PipelineError(f"data.source {source!r} is neither a folder, a file nor an http(s) URL")
    base, name = source.rstrip("/").rsplit("/", 1) if is_url(source) else (str(Path(source).parent), Path(source).name)
    try:
        copy_from(base, name, target, timeout_s)
    except FAILURES as exc:
        raise PipelineError(f"could not get {source} ({one_line(exc, 200)}); download it by hand and set "
                            "data.source to the file or to the unpacked folder") from None
