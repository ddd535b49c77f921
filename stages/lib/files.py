"""Writing outputs so that no reader ever sees half of them, and a failed run leaves the old ones whole.

A file is written to a temporary file in the same folder, fsynced and renamed over the old one. A stage
with several output files writes them with `write_files` (every temporary file first, then the renames),
and a stage whose output is a folder builds it in `replaced_dir`'s staging folder, which replaces the
old folder only when the stage succeeded. DVC is told not to delete these outputs before a stage runs
(`persist: true` in dvc.yaml), so a stage that fails leaves every output as it was.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from stages.lib.errors import PipelineError, one_line

DISK_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # a write the disk refused


def _cannot_write(path, exc: OSError) -> PipelineError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return PipelineError(f"cannot write {path}: {one_line(exc)}{where}")


def _temp_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed. A
    write the disk refuses inside the block (full, over a quota or a size limit, read-only) is one line
    that names `path`; other errors (a source that cannot be read) pass through as they are."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in DISK_REFUSED:
                raise _cannot_write(path, exc) from None
            raise
        try:
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as exc:
            raise _cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_files(contents: dict) -> None:
    """Write {path: bytes} together: every file goes to a temporary file first, and only when all of
    them are written (a full disk fails here) are they renamed into place."""
    temps = {}
    try:
        for path, data in contents.items():
            path = Path(path)
            temps[path] = _temp_beside(path)
            try:
                temps[path].write_bytes(data)
                _fsync(temps[path])
            except OSError as exc:  # out of disk, mostly
                raise _cannot_write(path, exc) from None
        for path, tmp in temps.items():
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _cannot_write(path, exc) from None
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def csv_bytes(rows: list[dict]) -> bytes:
    """Rows of one shape as CSV with a header, "\n" line ends (the metrics files DVC plots read)."""
    import csv

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def torch_bytes(obj) -> bytes:
    """torch.save's bytes, identical for identical objects: saving to a named file would embed that
    (temporary) name in the archive, so serialize in memory under torch's fixed name instead."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@contextmanager
def replaced_dir(target: str | os.PathLike):
    """Yield an empty staging folder beside `target` to build the new output in. When the block ends
    without an error the staging folder replaces `target` whole; on any error (or Ctrl-C) it is removed
    and `target` stays exactly as it was. A staging folder left by a killed run is cleared first."""
    target = Path(target)
    staging, old = target.with_name(f".{target.name}.staging"), target.with_name(f".{target.name}.old")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    try:
        try:
            yield staging
        except PipelineError as exc:  # name the output, not the staging folder it was being built in
            raise PipelineError(str(exc).replace(str(staging), str(target))) from None
        try:
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
        except OSError as exc:
            raise _cannot_write(target, exc) from None
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old.exists() and not target.exists():  # the swap itself failed half-way: put the old one back
            os.replace(old, target)


@contextmanager
def restored_on_failure(*paths: str | os.PathLike):
    """Files a block rewrites as it goes (train's live metrics): when the block fails or is interrupted,
    each is put back as it was before (or removed, if it did not exist), and folders it created for
    them are removed when empty."""
    paths = [Path(path) for path in paths]
    before = {path: path.read_bytes() if path.is_file() else None for path in paths}
    new_folders = [folder for folder in dict.fromkeys(path.parent for path in paths) if not folder.exists()]
    try:
        yield
    except BaseException:
        write_files({path: content for path, content in before.items() if content is not None})
        for path in (path for path, content in before.items() if content is None):
            path.unlink(missing_ok=True)
        for folder in new_folders:
            with contextlib.suppress(OSError):  # left alone if anything else was written there
                folder.rmdir()
        raise


def clear_temps(*paths: str | os.PathLike) -> None:
    """Remove the temporary files a killed run left beside `paths` (a SIGKILL between writing a
    temporary file and renaming it leaves one behind)."""
    for path in map(Path, paths):
        if path.parent.is_dir():
            for tmp in path.parent.glob(f".{path.name}.*.tmp"):
                tmp.unlink(missing_ok=True)


def md5_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
