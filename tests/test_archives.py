"""Archive unpacking refuses members that would escape the target folder."""
import io
import tarfile
import zipfile

import pytest

from stages.lib.archives import UnsafeArchive, extract
from stages.lib.errors import PipelineError


def make_tar(path, members):
    """members: [(name, bytes | None for a folder | ('symlink'|'hardlink', target))]."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, tuple):
                info.type = tarfile.SYMTYPE if content[0] == "symlink" else tarfile.LNKTYPE
                info.linkname = content[1]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def make_zip(path, members, symlink=None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members:
            zf.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, symlink[1])
    return path


GOOD = [("hymenoptera_data/", None), ("hymenoptera_data/train/ants/1.jpg", b"ant"),
        ("hymenoptera_data/val/bees/2.jpg", b"bee")]


def test_good_tar_and_zip_unpack(tmp_path):
    tar = make_tar(tmp_path / "a.tar.gz", GOOD)
    zf = make_zip(tmp_path / "a.zip", [(n, c) for n, c in GOOD if c])
    for archive in (tar, zf):
        target = extract(archive, tmp_path / f"out-{archive.name}")
        assert (target / "hymenoptera_data/train/ants/1.jpg").read_bytes() == b"ant"
        assert (target / "hymenoptera_data/val/bees/2.jpg").read_bytes() == b"bee"


@pytest.mark.parametrize("members, why", [
    ([("../evil.txt", b"x")], "outside the target folder"),
    ([("data/../../evil.txt", b"x")], "outside the target folder"),
    ([("/tmp/evil-absolute.txt", b"x")], "outside the target folder"),
    ([("data/link", ("symlink", "/etc/passwd"))], "is a link"),
    ([("data/link", ("symlink", "../../evil"))], "is a link"),
    ([("data/a.txt", b"a"), ("data/hard", ("hardlink", "data/a.txt"))], "is a link"),
])
def test_tar_members_that_escape_are_refused(tmp_path, members, why):
    archive = make_tar(tmp_path / "bad.tar.gz", [("data/ok.txt", b"ok"), *members])
    with pytest.raises(UnsafeArchive, match=why):
        extract(archive, tmp_path / "work" / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()
    assert list((tmp_path / "work").iterdir()) == []  # nothing half-unpacked, not even ok.txt


@pytest.mark.parametrize("members, symlink, why", [
    ([("../evil.txt", b"x")], None, "outside the target folder"),
    ([("/abs/evil.txt", b"x")], None, "outside the target folder"),
    ([("C:/evil.txt", b"x")], None, "outside the target folder"),
    ([("data\\..\\..\\evil.txt", b"x")], None, "outside the target folder"),
    ([], ("data/link", "/etc/passwd"), "link or special file"),
])
def test_zip_members_that_escape_are_refused(tmp_path, members, symlink, why):
    archive = make_zip(tmp_path / "bad.zip", [("data/ok.txt", b"ok"), *members], symlink)
    with pytest.raises(UnsafeArchive, match=why):
        extract(archive, tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []


def test_truncated_and_non_archives(tmp_path):
    good = make_tar(tmp_path / "a.tar.gz", GOOD + [("hymenoptera_data/big.bin", bytes(range(256)) * 4000)])
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PipelineError, match="damaged or truncated|neither a zip nor a tar"):
        extract(truncated, tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []
    text = tmp_path / "notes.txt"
    text.write_text("not an archive")
    with pytest.raises(PipelineError, match="neither a zip nor a tar"):
        extract(text, tmp_path / "work" / "out2")
