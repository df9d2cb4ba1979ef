"""crimpl.transfer against a hostile or broken server: a real sshd whose tar, find or awk lie.

Each test runs crimpl's protocol end to end through sshd (see tests/hostile.py);
the server answers with a crafted tar stream or a malformed listing. Nothing may
be written outside the destination, not even an mtime changed, and every failure
is one line, never a traceback or a hang.
"""

import tarfile
from pathlib import Path

import pytest

from crimpl import transfer
from crimpl.errors import TransferError
from hostile import LyingSshd, climbing_links, entry, tar_bytes, tree_state
from sandbox import start_pinned_sshd


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One lying sshd for this module."""
    sshd = start_pinned_sshd(tmp_path_factory.mktemp("lying-sshd"), LyingSshd)
    yield sshd
    sshd.stop()


@pytest.fixture
def lying(server):
    """The lying sshd, telling the truth again after the test."""
    yield server
    server.tell_the_truth()


@pytest.fixture(scope="module")
def sshd(server):
    """The lying sshd is the one that conftest's ``connect`` connects to."""
    return server


@pytest.fixture
def remote(tmp_path):
    """The job folder on the server: an honest ``results`` folder to ask for."""
    folder = tmp_path / "remote"
    (folder / "results").mkdir(parents=True)
    (folder / "results" / "honest.txt").write_text("honest\n")
    return folder


@pytest.fixture
def outside(tmp_path):
    """What a hostile server aims at, beside the destination: a fake HOME and other files."""
    root = tmp_path / "outside"
    (root / "home" / ".ssh").mkdir(parents=True)
    (root / "home" / ".ssh").chmod(0o700)
    (root / "home" / ".ssh" / "known_hosts").write_text("pinned\n")
    (root / "victim.txt").write_text("mine\n")
    (root / "victim.txt").chmod(0o600)
    (root / "folder").mkdir()
    (root / "folder").chmod(0o750)
    return root


def test_the_lying_tar_is_what_a_download_receives(lying, connect, remote, tmp_path):
    lying.lie("tar", tar_bytes(entry("results/honest.txt", data=b"served by the lying tar\n")))
    dest = tmp_path / "dest"

    transfer.download(connect(), str(remote), "results", str(dest) + "/", quiet=True)

    assert (dest / "results" / "honest.txt").read_text() == "served by the lying tar\n"


def _hostile_archives(outside):
    """``{variant: [(TarInfo, data), ...]}``, each a way to write or point outside."""
    victim = str(outside / "victim.txt").lstrip("/")
    keys = str(outside / "home" / ".ssh" / "authorized_keys").lstrip("/")
    folder = str(outside / "folder").lstrip("/")
    links, top = climbing_links("results")
    return {
        "symlink then file of the same name": [
            *links, entry("results/t", tarfile.SYMTYPE, f"{top}/{victim}"),
            entry("results/t", data=b"overwritten\n", mode=0o777)],
        "symlink then folder of the same name": [
            *links, entry("results/d", tarfile.SYMTYPE, f"{top}/{folder}"),
            entry("results/d", tarfile.DIRTYPE, mode=0o777)],
        "authorized_keys through a symlink": [
            *links, entry("results/k", tarfile.SYMTYPE, f"{top}/{keys}"),
            entry("results/k", data=b"ssh-ed25519 AAAA attacker\n", mode=0o600)],
        "chained links then a file below the last": [
            entry("results/l", tarfile.SYMTYPE, "."), entry("results/u1", tarfile.SYMTYPE, "l/.."),
            entry("results/u2", tarfile.SYMTYPE, "u1/.."), entry("results/u2/x", data=b"x")],
        "deep chain then a file below it": [*links, entry(f"results/{top}/{victim}", data=b"x")],
        "chain written in the other order": [
            *reversed(links), entry("results/t", tarfile.SYMTYPE, f"{top}/{victim}"),
            entry("results/t", data=b"x")],
        "link to an absolute path": [
            entry("results/abs", tarfile.SYMTYPE, f"/{victim}"), entry("results/abs", data=b"x")],
        "link to ..": [entry("results/up", tarfile.SYMTYPE, "../.."), entry("results/up/victim.txt")],
        "file below a link that stays inside": [
            entry("results/sub", tarfile.DIRTYPE), entry("results/in", tarfile.SYMTYPE, "sub"),
            entry("results/in/x", data=b"x")],
        "hard link": [entry("results/h", tarfile.LNKTYPE, f"/{victim}")],
        "device": [entry("results/dev", tarfile.CHRTYPE)],
        "fifo": [entry("results/fifo", tarfile.FIFOTYPE)],
        "two files of the same name": [entry("results/f", data=b"1"), entry("results/f", data=b"2")],
        "file then folder of the same name": [
            entry("results/x", data=b"1"), entry("results/x", tarfile.DIRTYPE)],
        "folder then file of the same name": [
            entry("results/x", tarfile.DIRTYPE), entry("results/x", data=b"1")],
        "'..' in a name": [entry("results/../../outside/victim.txt", data=b"x")],
        "absolute name": [entry(f"/{victim}", data=b"x")],
    }


VARIANTS = list(_hostile_archives(Path("/outside")))


@pytest.mark.parametrize("existing_dest", [False, True], ids=["new dest", "existing dest"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hostile_archive_is_refused_and_nothing_outside_is_touched(
        lying, connect, remote, outside, tmp_path, variant, existing_dest):
    lying.lie("tar", tar_bytes(entry("results", tarfile.DIRTYPE), *_hostile_archives(outside)[variant]))
    parent = tmp_path / "fresh"
    dest = parent / "dest"
    if existing_dest:
        dest.mkdir(parents=True)
        (dest / "mine.txt").write_text("local\n")
        before_dest = _inside(dest)
    before = tree_state(outside)

    with pytest.raises(TransferError) as info:
        transfer.download(connect(), str(remote), "results", str(dest) + "/", quiet=True)

    assert tree_state(outside) == before
    assert not (outside / "home" / ".ssh" / "authorized_keys").exists()
    message = str(info.value)
    assert "invalid or hostile archive entry" in message and "nothing was written" in message
    assert "\n" not in message
    if existing_dest:
        assert _inside(dest) == before_dest
    else:
        assert not parent.exists()
    assert not list(tmp_path.glob("**/.crimpl-download-*"))


def _inside(folder):
    """The state of what ``folder`` holds (its own mtime changes with any download into it)."""
    return {rel: state for rel, state in tree_state(folder).items() if rel != "."}


def test_an_entry_that_was_not_asked_for_is_refused(lying, connect, remote, tmp_path):
    lying.lie("tar", tar_bytes(entry("results/ok.txt", data=b"ok"), entry("elsewhere.txt", data=b"x")))
    dest = tmp_path / "dest"

    with pytest.raises(TransferError, match="not asked for"):
        transfer.download(connect(), str(remote), "results", str(dest) + "/", quiet=True)

    assert not dest.exists()


def test_a_stream_that_is_not_tar_is_a_one_line_error(lying, connect, remote, tmp_path):
    lying.lie("tar", b"<html>502 Bad Gateway</html>\n" * 40)

    with pytest.raises(TransferError, match="nothing was written") as info:
        transfer.download(connect(), str(remote), "results", str(tmp_path / "dest") + "/", quiet=True)

    assert "\n" not in str(info.value)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("totals", [
    b"hello from a .bashrc\n", b"5\n", b"5 x\n", b"\xff\xfe\n", b"x" * 10_000, b"x" * 100,
], ids=["text", "short", "not a number", "not utf-8", "no newline", "short without newline"])
def test_a_malformed_answer_to_a_download_is_a_one_line_error(lying, connect, remote, tmp_path, totals):
    lying.lie("awk", totals)

    with pytest.raises(TransferError, match="malformed") as info:
        transfer.download(connect(), str(remote), "results", str(tmp_path / "dest") + "/", quiet=True)

    assert "\n" not in str(info.value)
    assert not (tmp_path / "dest").exists()


def _listing(*fields):
    """A find listing as the upload command prints it: NUL-terminated fields."""
    return b"".join(field + b"\0" for field in fields)


@pytest.mark.parametrize("listing", [
    _listing(b"f", b"big", b"1.0", b"644", b"", b"./src/a.txt"),
    _listing(b"f", b"2", b"yesterday", b"644", b"", b"./src/a.txt"),
    _listing(b"f", b"2", b"1.0", b"rw-r--r--", b"", b"./src/a.txt"),
    _listing(b"f", b"2", b"1.0", b"644", b"", b"src/a.txt"),
    _listing(b"f", b"2", b"1.0"),
    _listing(b"file", b"2", b"1.0", b"644", b"", b"./src/a.txt"),
], ids=["size", "mtime", "mode", "path", "short", "kind"])
def test_a_malformed_listing_from_the_server_is_a_one_line_error(lying, connect, tmp_path, listing):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a\n")
    lying.lie("find", listing)

    with pytest.raises(TransferError, match="listing is malformed") as info:
        transfer.upload(connect(), [tmp_path / "src"], str(tmp_path / "remote"), quiet=True)

    assert "\n" not in str(info.value)
    assert not (tmp_path / "remote" / transfer.MANIFEST).exists()
