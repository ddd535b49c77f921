"""The download stage and the idx reader: sources tried in order, every file verified, nothing partial left.

Network tests talk only to servers these tests start on 127.0.0.1, with short timeouts.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_stage, write_params
from stages.lib.datasets import FASHION_MNIST, read_idx
from stages.lib.errors import PipelineError

DS = FASHION_MNIST
MD5 = dict(DS.files)                      # file name -> official md5 of the .gz
NAMES = list(MD5)
LABELS = "t10k-labels-idx1-ubyte.gz"     # the smallest file (5 KB): used where one file is enough
TIMEOUT = 5.0


def listing(folder: Path) -> list[str]:
    """Every entry in `folder`, dot-files (leftover temp files) included."""
    return sorted(os.listdir(folder))


def content(path: Path) -> bytes:
    return gzip.decompress(Path(path).read_bytes())


def invalid_block_type(data: bytes) -> bytes:
    """A gzip whose first deflate block has the reserved type 3: zlib itself rejects it (zlib.error)."""
    packed = bytearray(gzip.compress(data, mtime=0))
    packed[10] |= 0b110  # byte 10 is the first block header (no FNAME in this header): BTYPE bits = 11
    return bytes(packed)


# --- a real HTTP server on 127.0.0.1 ---------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; /truncated/NAME promises good/NAME whole but sends half, /garbage/ is not HTTP."""

    def do_GET(self):
        self.server.requests.append(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "truncated":
            body = Path(self.directory, "good", name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif kind == "garbage":
            self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")
            self.close_connection = True
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server(tmp_path_factory, mirror):
    root = tmp_path_factory.mktemp("www")
    (root / "good").mkdir()
    (root / "wrong").mkdir()
    (root / "missing").mkdir()
    for name in NAMES:
        (root / "good" / name).write_bytes((mirror / name).read_bytes())
        (root / "wrong" / name).write_bytes(gzip.compress(b"not the data set", mtime=0))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield SimpleNamespace(url=lambda kind: f"{base}/{kind}", requests=server.requests)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def www(http_server):
    http_server.requests.clear()
    return http_server


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A port that accepts a connection and never answers; it hangs up after 10 s so nothing can hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def hold():
        listener.settimeout(10)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            stop.wait(10)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(timeout=15)


# --- local folders -------------------------------------------------------------------------------

def test_download_from_debian_folder(mirror, tmp_path):
    dest = tmp_path / "raw"
    used = DS.download(dest, [str(mirror)], TIMEOUT)
    assert used == {name: str(mirror) for name in NAMES}
    assert listing(dest) == sorted(NAMES)
    for name in NAMES:
        assert DS.file_matches(dest / name, name, MD5[name])
        assert (dest / name).read_bytes() == (mirror / name).read_bytes()


def test_bad_first_folder_is_skipped_for_the_next_source(mirror, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    images, labels, test_images, test_labels = NAMES
    flipped = bytearray((mirror / images).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (bad / images).write_bytes(bytes(flipped))                                   # one wrong byte
    # labels: missing
    (bad / test_images).write_bytes((mirror / test_images).read_bytes()[:100_000])  # truncated
    (bad / test_labels).write_bytes(invalid_block_type(content(mirror / test_labels)))  # corrupt deflate
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / labels).write_bytes(b"stale")  # a wrong file already in place is replaced

    used = DS.download(dest, [str(bad), str(mirror)], TIMEOUT)

    assert used == {name: str(mirror) for name in NAMES}
    assert listing(dest) == sorted(NAMES)  # no .NAME.*.tmp left behind
    for name in NAMES:
        assert (dest / name).read_bytes() == (mirror / name).read_bytes()


def test_first_good_source_wins(mirror, tmp_path):
    second = tmp_path / "second"
    second.mkdir()
    (second / LABELS).write_bytes(gzip.compress(content(mirror / LABELS), mtime=0))
    assert DS.fetch_file(LABELS, [str(second), str(mirror)], tmp_path / "a", TIMEOUT) == str(second)
    assert DS.fetch_file(LABELS, [str(mirror), str(second)], tmp_path / "b", TIMEOUT) == str(mirror)


# --- HTTP ----------------------------------------------------------------------------------------

def test_http_source_serves_real_files(www, mirror, tmp_path):
    dest = tmp_path / "raw"
    url = www.url("good") + "/"  # a trailing slash on a base URL is fine
    used = DS.download(dest, [url], TIMEOUT)
    assert used == {name: url for name in NAMES}
    assert sorted(www.requests) == sorted(f"/good/{name}" for name in NAMES)
    assert listing(dest) == sorted(NAMES)
    for name in NAMES:
        assert (dest / name).read_bytes() == (mirror / name).read_bytes()


@pytest.mark.parametrize("kind, why", [
    ("wrong", "checksum mismatch"),
    ("missing", "HTTP 404"),
    ("truncated", "truncated"),
    ("garbage", "bad HTTP response"),
])
def test_bad_http_source_is_refused_and_the_next_one_used(www, mirror, tmp_path, kind, why):
    bad = www.url(kind)
    with pytest.raises(PipelineError) as failed:
        DS.fetch_file(LABELS, [bad], tmp_path / "alone", TIMEOUT)
    assert f"{bad} ({why}" in str(failed.value)
    assert listing(tmp_path / "alone") == []  # no partial or wrong file, no temp file

    dest = tmp_path / "raw"
    assert DS.fetch_file(LABELS, [bad, www.url("good")], dest, TIMEOUT) == www.url("good")
    assert www.requests == [f"/{kind}/{LABELS}"] * 2 + [f"/good/{LABELS}"]
    assert listing(dest) == [LABELS]
    assert (dest / LABELS).read_bytes() == (mirror / LABELS).read_bytes()


def test_all_sources_failing_names_each_and_says_how_to_fix(www, tmp_path, closed_port):
    sources = [str(tmp_path / "nowhere"), www.url("missing"), www.url("wrong"), www.url("truncated"),
               www.url("garbage"), f"http://127.0.0.1:{closed_port}"]
    dest = tmp_path / "raw"
    with pytest.raises(PipelineError) as failed:
        DS.download(dest, sources, TIMEOUT)
    message = str(failed.value)
    assert "\n" not in message
    assert NAMES[0] in message
    for source in sources:
        assert f"{source} (" in message
    assert "data.mirrors" in message and DS.debian_package in message
    assert listing(dest) == []


def test_no_sources_at_all(tmp_path):
    with pytest.raises(PipelineError, match="no sources"):
        DS.fetch_file(LABELS, [], tmp_path, TIMEOUT)


# --- offline ---------------------------------------------------------------------------------------

def test_offline_closed_port_fails_with_pipeline_error(tmp_path, closed_port):
    source = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(PipelineError, match="refused") as failed:
        DS.download(tmp_path / "raw", [source], 1.0)
    assert source in str(failed.value)
    assert listing(tmp_path / "raw") == []


def test_silent_server_times_out_after_timeout_s(tmp_path, silent_port):
    source = f"http://127.0.0.1:{silent_port}"
    with pytest.raises(PipelineError, match="timed out"):
        DS.fetch_file(LABELS, [source], tmp_path, 0.5)
    assert listing(tmp_path) == []


# --- sources_for ---------------------------------------------------------------------------------

def test_sources_for_order(mirror):
    mirrors = ["/my/folder", "http://127.0.0.1:9/base/"]
    official = DS.official_mirrors
    assert official and all(m.startswith(("http://", "https://")) for m in official)
    assert DS.system_dirs() == [str(mirror)]
    assert DS.sources(mirrors) == [*mirrors, str(mirror), *official]
    # each source once, at its first place
    assert DS.sources([str(mirror), "/a", "/a"]) == [str(mirror), "/a", *official]


def test_system_dirs_reads_dpkg_listing_else_the_usual_place(monkeypatch):
    listing_ = "/.\n/opt/fm\n" + "".join(f"/opt/fm/{n}\n" for n in NAMES) + "/usr/share/doc/x/copyright\n"
    monkeypatch.setattr("stages.lib.datasets.shutil.which", lambda cmd: "/usr/bin/dpkg")
    monkeypatch.setattr("stages.lib.datasets.subprocess.run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=listing_, stderr=""))
    assert DS.system_dirs() == ["/opt/fm"]
    monkeypatch.setattr("stages.lib.datasets.subprocess.run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, stdout="", stderr="not installed"))
    assert DS.system_dirs() == [DS.default_system_dir]
    monkeypatch.setattr("stages.lib.datasets.shutil.which", lambda cmd: None)
    assert DS.system_dirs() == [DS.default_system_dir]


# --- file_matches --------------------------------------------------------------------------------

def test_debian_files_differ_from_official_gz_but_match(mirror):
    for name in NAMES:
        assert hashlib.md5((mirror / name).read_bytes()).hexdigest() != MD5[name]  # re-gzipped by Debian
        assert DS.file_matches(mirror / name, name, MD5[name])


def test_file_matches_accepts_the_official_gz_md5(tmp_path):
    path = tmp_path / "f.gz"
    path.write_bytes(b"whatever bytes the official .gz holds")
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert DS.file_matches(path, LABELS, md5)
    assert not DS.file_matches(path, LABELS, MD5[LABELS])


def test_file_matches_accepts_repacked_content(mirror, tmp_path):
    repacked = gzip.compress(content(mirror / LABELS), mtime=0, compresslevel=1)
    assert repacked != (mirror / LABELS).read_bytes()
    path = tmp_path / LABELS
    path.write_bytes(repacked)
    assert DS.file_matches(path, LABELS, MD5[LABELS])
    # the same bytes are not some other file of the set
    other = "train-labels-idx1-ubyte.gz"
    assert not DS.file_matches(path, other, MD5[other])


def _flip_content_byte(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-1] ^= 1
    return gzip.compress(bytes(flipped), mtime=0)


@pytest.mark.parametrize("corrupt", [
    pytest.param(_flip_content_byte, id="content-byte-flipped"),
    pytest.param(lambda data: b"not gzip at all\n" * 10, id="not-gzip"),
    pytest.param(lambda data: b"", id="empty"),
    pytest.param(lambda data: gzip.compress(data, mtime=0)[:-20], id="truncated-gz"),
    pytest.param(invalid_block_type, id="corrupt-deflate"),
])
def test_file_matches_rejects(mirror, tmp_path, corrupt):
    path = tmp_path / LABELS
    path.write_bytes(corrupt(content(mirror / LABELS)))
    assert not DS.file_matches(path, LABELS, MD5[LABELS])


# --- read_idx ------------------------------------------------------------------------------------

def idx_file(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "x-idx.gz"
    path.write_bytes(gzip.compress(raw))
    return path


def test_read_idx_real_labels(mirror):
    labels = read_idx(mirror / LABELS)
    assert labels.shape == (10000,) and labels.dtype == torch.uint8
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels.long()).tolist() == [1000] * 10  # the test split is balanced


def test_read_idx_real_images(mirror):
    images = read_idx(mirror / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert int(images.max()) > 0


def test_read_idx_header_order(tmp_path):
    raw = bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(6))
    assert read_idx(idx_file(tmp_path, raw)).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("raw, why", [
    pytest.param(bytes([0, 0, 0x0D, 1]) + (4).to_bytes(4, "big") + bytes(16), "not an idx", id="float-magic"),
    pytest.param(bytes([8, 0, 0, 1]) + (4).to_bytes(4, "big") + bytes(4), "not an idx", id="bad-magic"),
    pytest.param(b"\x00\x00", "not an idx", id="too-short"),
    pytest.param(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(9), "header says", id="one-byte-short"),
    pytest.param(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(11), "header says", id="one-byte-long"),
    pytest.param(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big"), "header says", id="header-cut"),
])
def test_read_idx_rejects(tmp_path, raw, why):
    with pytest.raises(PipelineError, match=why):
        read_idx(idx_file(tmp_path, raw))


def test_read_idx_rejects_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "x-idx.gz"
    path.write_bytes(bytes([0, 0, 8, 1]) + (1).to_bytes(4, "big") + b"\x07")  # idx, but not gzip'd
    with pytest.raises(PipelineError, match="not a readable gzip"):
        read_idx(path)


# --- the stage's command line ----------------------------------------------------------------------

def test_cli_uses_mirrors_in_order_and_reports_each_source(www, mirror, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / LABELS).write_bytes(b"corrupt copy")  # only a wrong copy of one file; the rest missing
    good = www.url("good")
    write_params(tmp_path, {"data": {"mirrors": [str(bad), good], "timeout_s": TIMEOUT}})

    result = run_stage(tmp_path, "download", timeout=120)

    assert result.returncode == 0, result.stderr
    dest = Path("data/raw/fashion_mnist")
    assert result.stdout.splitlines() == [f"{dest / name}  <- {good}" for name in NAMES]
    assert listing(tmp_path / dest) == sorted(NAMES)
    for name in NAMES:
        assert (tmp_path / dest / name).read_bytes() == (mirror / name).read_bytes()
    assert sorted(www.requests) == sorted(f"/good/{name}" for name in NAMES)
