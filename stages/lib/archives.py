"""Unpacking downloaded archives (tar, tar.gz, zip) without trusting their member names.

Every member must land inside the target folder: absolute paths, `..` components, links, device
files and the like are refused before anything is written, and the archive is unpacked into a
temporary folder that is renamed into place only when everything went well.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from stages.lib.errors import PipelineError, one_line


class UnsafeArchive(PipelineError):
    pass


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"{archive}: member {name!r} would be written outside the target folder")


def _tar_members(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        _check_name(archive, member.name)
        if not (member.isfile() or member.isdir()):
            kind = "link" if member.issym() or member.islnk() else "special file"
            raise UnsafeArchive(f"{archive}: member {member.name!r} is a {kind}; only files and folders are unpacked")
    return members


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for member in members:
        _check_name(archive, member.filename)
        mode = member.external_attr >> 16
        if (mode & 0o170000) not in (0, 0o100000, 0o040000):  # regular file, folder, or no type given
            raise UnsafeArchive(f"{archive}: member {member.filename!r} is a link or special file")
    return members


def extract(archive: Path, target: Path) -> Path:
    """Unpack `archive` (tar, tar.gz/tgz, zip) into `target`, which must not exist yet."""
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(archive, zf)
                for member in members:
                    zf.extract(member, staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(staging, members=_tar_members(archive, tar), filter="data")
        else:
            raise PipelineError(f"{archive} is neither a zip nor a tar archive")
        os.replace(staging, target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError(f"{archive} is damaged or truncated ({exc.__class__.__name__}: {one_line(exc)})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
