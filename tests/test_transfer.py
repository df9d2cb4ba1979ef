"""crimpl.transfer against a real sshd on loopback, and against the local target.

The "remote" side of the sshd is this machine, so tests look at remote files
directly on disk. Every test that makes sense for both targets runs twice: over
SSH (a fabric Connection with the host key pinned) and with an invoke.Context.
"""

import getpass
import hashlib
import io
import json
import os
import signal
import stat
import tarfile
from pathlib import Path

import invoke
import pytest

from crimpl import hostkeys, ssh, transfer
from crimpl.errors import TransferError
from crimpl.hostkeys import generate_host_key
from sandbox import Sshd, make_client_key, wait_until


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """One sshd on a loopback port for this module, with a pinned ed25519 host key."""
    workdir = tmp_path_factory.mktemp("transfer-sshd")
    key = make_client_key(workdir)
    private, public = generate_host_key()
    server = Sshd(workdir / "sshd", private, key.with_suffix(".pub").read_text()).start()
    server.client_key = key
    server.host_public = public
    yield server
    server.stop()


def cut_after_first_mib(conn, how, sshd):
    """Return a transfer callback that breaks the connection once 1 MiB has moved.

    :param how: "client drops the connection", or anything else to kill the server's sessions.
    """

    def interrupt(done, total):
        if done > 2**20:
            if how == "client drops the connection":
                conn.client.get_transport().close()
            else:
                kill_sessions(sshd)

    return interrupt


@pytest.fixture
def connect(sshd):
    """Return a factory of fresh, unopened fabric Connections that verify the host key."""
    opened = []

    def make():
        conn = ssh.connection("127.0.0.1", getpass.getuser(), sshd.client_key, "test-sshd",
                              expected_key=hostkeys.key_from_line(sshd.host_public), port=sshd.port)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


@pytest.fixture(params=["ssh", "local"])
def target(request, connect):
    """A factory of connections to the target under test: sshd, or the local target."""
    if request.param == "ssh":
        return connect
    return invoke.Context


# --------------------------------------------------------------------------- helpers


def write(path, data=b"", mode=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    if mode is not None:
        path.chmod(mode)
    return path


def snapshot(root):
    """``{relative path: (kind, mode, content or link target)}`` of a tree, for comparisons."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", None, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), None)
            else:
                out[rel] = ("f", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def make_tree(root):
    """A tree with nested and empty folders, empty files, symlinks, modes and odd names."""
    root = Path(root)
    write(root / "top.txt", "top\n", 0o644)
    write(root / "empty.txt", b"", 0o600)
    write(root / "run.sh", "#!/bin/sh\necho hi\n", 0o755)
    write(root / "a" / "b" / "c" / "deep.dat", os.urandom(70_000), 0o640)
    write(root / "données" / "résumé ü.txt", "naïve\n")
    write(root / "日本語" / "ファイル.txt", "こんにちは\n")
    write(root / "with space" / "-dash and 'quote'.txt", "odd\n")
    write(root / ("long" * 30) / ("name" * 40 + ".txt"), "long\n")
    (root / "emptydir").mkdir()
    (root / "private").mkdir()
    write(root / "private" / "key", "secret\n", 0o600)
    (root / "private").chmod(0o700)
    (root / "a" / "b").chmod(0o750)
    os.symlink("../top.txt", root / "a" / "link-to-top")
    os.symlink("b/c", root / "a" / "link-to-dir")
    os.symlink("does-not-exist", root / "dangling")
    return root


def session_pids(listener_pid):
    """Every process below the sshd listener: the per-connection sshd, its shell, tar."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [listener_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_sessions(sshd):
    for pid in session_pids(sshd.process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- upload


def test_tree_round_trips_with_layout_modes_symlinks_and_odd_names(target, tmp_path):
    source = make_tree(tmp_path / "tree")
    remote = tmp_path / "remote" / "job"
    calls = []

    report = transfer.upload(target(), [source], str(remote), quiet=True,
                             callback=lambda done, total: calls.append((done, total)))

    assert snapshot(remote / "tree") == snapshot(source)
    expected_files = {k for k, v in snapshot(source).items() if v[0] != "d"}
    assert set(report.files) == {f"tree/{rel}" for rel in expected_files}
    assert report.files_sent == len(expected_files)
    assert report.bytes_sent == sum(len(v[2]) for v in snapshot(source).values() if v[0] == "f")
    assert calls and calls[-1][1] == report.bytes_sent

    back = tmp_path / "back"
    down = transfer.download(target(), str(remote), "tree", str(back), quiet=True)

    assert snapshot(back / "tree") == snapshot(source)
    assert down.files_sent == len(expected_files)
    assert down.replaced == []
    assert not list(tmp_path.glob("**/.crimpl-download-*"))


def test_several_sources_land_under_their_basenames(target, tmp_path):
    write(tmp_path / "in" / "params.json", "{}")
    write(tmp_path / "data" / "x.csv", "1,2\n")
    remote = tmp_path / "remote"

    report = transfer.upload(target(), [tmp_path / "in" / "params.json", str(tmp_path / "data") + "/"],
                             str(remote), quiet=True)

    assert (remote / "params.json").read_text() == "{}"
    assert (remote / "data" / "x.csv").read_text() == "1,2\n"
    assert sorted(report.files) == ["data/x.csv", "params.json"]


def test_reupload_sends_only_what_changed(target, tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        write(src / f"f{i}.txt", f"content {i}\n")
    write(src / "sub" / "g.txt", "g\n")
    remote = tmp_path / "remote"

    first = transfer.upload(target(), [src], str(remote), quiet=True)
    assert (first.files_sent, first.files_skipped) == (6, 0)

    again = transfer.upload(target(), [src], str(remote), quiet=True)
    assert (again.files_sent, again.files_skipped, again.bytes_sent) == (0, 6, 0)

    # Same size, new content: the hash tells.
    write(src / "f1.txt", "CONTENT 1\n")
    changed = transfer.upload(target(), [src], str(remote), quiet=True)
    assert (changed.files_sent, changed.files_skipped) == (1, 5)
    assert changed.files == ["src/f1.txt"]
    assert (remote / "src" / "f1.txt").read_text() == "CONTENT 1\n"

    # A new mtime with the same content is not a change.
    os.utime(src / "f2.txt", (1_000_000_000, 1_000_000_000))
    touched = transfer.upload(target(), [src], str(remote), quiet=True)
    assert touched.files_sent == 0

    # A new file, and a mode change.
    write(src / "sub" / "new.txt", "new\n")
    (src / "f3.txt").chmod(0o700)
    more = transfer.upload(target(), [src], str(remote), quiet=True)
    assert sorted(more.files) == ["src/f3.txt", "src/sub/new.txt"]
    assert stat.S_IMODE((remote / "src" / "f3.txt").stat().st_mode) == 0o700

    # Changed or removed on the server behind crimpl's back: sent again.
    with open(remote / "src" / "f4.txt", "a") as handle:
        handle.write("edited on the server\n")
    (remote / "src" / "f0.txt").unlink()
    repaired = transfer.upload(target(), [src], str(remote), quiet=True)
    assert sorted(repaired.files) == ["src/f0.txt", "src/f4.txt"]
    assert snapshot(remote / "src") == snapshot(src)


def test_manifest_is_kept_in_remote_dir(target, tmp_path):
    write(tmp_path / "src" / "a.txt", "a\n")
    remote = tmp_path / "remote"

    transfer.upload(target(), [tmp_path / "src"], str(remote), quiet=True)

    manifest = json.loads((remote / transfer.MANIFEST).read_text())
    assert manifest["files"]["src/a.txt"][4] == hashlib.sha256(b"a\n").hexdigest()
    assert not list(remote.glob(".crimpl-upload-*"))


def test_a_path_that_changes_type_is_replaced(target, tmp_path):
    src = tmp_path / "src"
    write(src / "thing" / "inside.txt", "dir version\n")
    write(src / "other", "file version\n")
    remote = tmp_path / "remote"
    transfer.upload(target(), [src], str(remote), quiet=True)

    (src / "thing" / "inside.txt").unlink()
    (src / "thing").rmdir()
    write(src / "thing", "now a file\n")
    (src / "other").unlink()
    write(src / "other" / "now.txt", "now a folder\n")
    transfer.upload(target(), [src], str(remote), quiet=True)

    assert (remote / "src" / "thing").read_text() == "now a file\n"
    assert (remote / "src" / "other" / "now.txt").read_text() == "now a folder\n"


def test_crimplignore_is_honoured_at_every_level(target, tmp_path):
    src = tmp_path / "src"
    write(src / ".crimplignore", "*.log\nbuild/\n!keep.log\n")
    write(src / "a.log", "x")
    write(src / "keep.log", "x")
    write(src / "build" / "out.o", "x")
    write(src / "main.py", "x")
    write(src / "secret.txt", "x")
    write(src / "sub" / ".crimplignore", "secret.txt\n")
    write(src / "sub" / "secret.txt", "x")
    write(src / "sub" / "b.log", "x")
    write(src / "sub" / "c.txt", "x")
    remote = tmp_path / "remote"

    report = transfer.upload(target(), [src], str(remote), quiet=True)

    uploaded = {k for k, v in snapshot(remote / "src").items() if v[0] == "f"}
    assert uploaded == {".crimplignore", "keep.log", "main.py", "secret.txt",
                        "sub/.crimplignore", "sub/c.txt"}
    assert report.files_sent == len(uploaded)


def test_missing_source_is_reported_before_anything_is_sent(connect, tmp_path):
    write(tmp_path / "present.txt", "here")
    conn = connect()
    remote = tmp_path / "remote"

    with pytest.raises(TransferError, match="missing.txt") as info:
        transfer.upload(conn, [tmp_path / "present.txt", tmp_path / "missing.txt"], str(remote))

    assert "\n" not in str(info.value)
    assert not conn.is_connected  # not even a connection was opened
    assert not remote.exists()


def test_two_sources_with_the_same_name_are_refused(target, tmp_path):
    write(tmp_path / "x" / "data.txt", "1")
    write(tmp_path / "y" / "data.txt", "2")

    with pytest.raises(TransferError, match="data.txt"):
        transfer.upload(target(), [tmp_path / "x" / "data.txt", tmp_path / "y" / "data.txt"],
                        str(tmp_path / "remote"))

    assert not (tmp_path / "remote").exists()


@pytest.mark.parametrize("how", ["client drops the connection", "server session is killed"])
def test_upload_killed_midway_leaves_nothing_half_done_and_a_retry_completes(
        connect, sshd, tmp_path, how):
    src = tmp_path / "src"
    write(src / "small.txt", "version 1\n")
    remote = tmp_path / "remote"
    first = connect()
    transfer.upload(first, [src], str(remote), quiet=True)
    first.close()
    manifest_before = (remote / transfer.MANIFEST).read_bytes()

    write(src / "small.txt", "version 2, longer\n")
    with open(src / "big.bin", "wb") as handle:
        handle.truncate(200 * 2**20)  # sparse: cheap to make, still 200 MiB to send
    conn = connect()
    interrupt = cut_after_first_mib(conn, how, sshd)

    with pytest.raises(TransferError, match="retry"):
        transfer.upload(conn, [src], str(remote), quiet=True, callback=interrupt)

    # Nothing was moved into place, and the manifest still describes what is there.
    assert (remote / "src" / "small.txt").read_text() == "version 1\n"
    assert not (remote / "src" / "big.bin").exists()
    assert (remote / transfer.MANIFEST).read_bytes() == manifest_before
    # Let the interrupted session end, so the retry is not racing its tar.
    wait_until(lambda: not session_pids(sshd.process.pid), timeout=30, what="old session ends")

    retry = transfer.upload(connect(), [src], str(remote), quiet=True)

    assert sorted(retry.files) == ["src/big.bin", "src/small.txt"]
    assert (remote / "src" / "small.txt").read_text() == "version 2, longer\n"
    assert (remote / "src" / "big.bin").stat().st_size == 200 * 2**20
    assert not list(remote.glob(".crimpl-upload-*"))
    assert transfer.upload(connect(), [src], str(remote), quiet=True).files_sent == 0


# --------------------------------------------------------------------------- download


@pytest.fixture
def outputs(tmp_path):
    """A job folder on the "server" with outputs, as a script would leave it."""
    remote = tmp_path / "remote"
    write(remote / "a.txt", "a\n")
    write(remote / "b.txt", "b\n")
    write(remote / "notes.md", "notes\n")
    write(remote / "out" / "x.dat", "x\n")
    write(remote / "out" / "y.dat", "y\n")
    write(remote / "out" / "sub" / "z.dat", "z\n")
    write(remote / transfer.MANIFEST, "{}")
    return remote


def test_glob_downloads_keep_relative_paths(target, outputs, tmp_path):
    dest = tmp_path / "dest"

    report = transfer.download(target(), str(outputs), "out/*.dat", str(dest) + "/", quiet=True)

    assert sorted(report.files) == ["out/x.dat", "out/y.dat"]
    assert (dest / "out" / "x.dat").read_text() == "x\n"
    assert not (dest / "out" / "sub").exists()


def test_directory_download_is_recursive(target, outputs, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()

    report = transfer.download(target(), str(outputs), "out", str(dest), quiet=True)

    assert snapshot(dest / "out") == snapshot(outputs / "out")
    assert report.files_sent == 3


def test_downloading_into_an_existing_folder_merges(target, outputs, tmp_path):
    dest = tmp_path / "dest"
    write(dest / "out" / "mine.txt", "local only\n")
    write(dest / "out" / "x.dat", "x\n")

    report = transfer.download(target(), str(outputs), "out", str(dest), quiet=True)

    assert (dest / "out" / "mine.txt").read_text() == "local only\n"
    assert (dest / "out" / "sub" / "z.dat").read_text() == "z\n"
    assert (report.files_sent, report.files_skipped, report.replaced) == (3, 1, [])


def test_list_of_paths_downloads_each(target, outputs, tmp_path):
    dest = tmp_path / "dest"

    report = transfer.download(target(), str(outputs), ["a.txt", "out/sub", "*.md"], str(dest),
                               quiet=True)

    assert sorted(report.files) == ["a.txt", "notes.md", "out/sub/z.dat"]
    assert (dest / "out" / "sub" / "z.dat").read_text() == "z\n"


def test_whole_folder_download_skips_crimpl_bookkeeping(target, outputs, tmp_path):
    report = transfer.download(target(), str(outputs), ".", str(tmp_path / "dest"), quiet=True)

    assert "a.txt" in report.files
    assert not (tmp_path / "dest" / transfer.MANIFEST).exists()


def test_one_file_is_written_as_the_destination_path(target, outputs, tmp_path):
    dest = tmp_path / "results" / "renamed.txt"

    report = transfer.download(target(), str(outputs), "a.txt", str(dest), quiet=True)

    assert dest.read_text() == "a\n"
    assert report.files == ["a.txt"]


def test_one_file_goes_inside_an_existing_directory(target, outputs, tmp_path):
    dest = tmp_path / "results"
    dest.mkdir()

    transfer.download(target(), str(outputs), "out/x.dat", str(dest), quiet=True)

    assert (dest / "out" / "x.dat").read_text() == "x\n"


def test_several_matches_make_the_destination_a_directory(target, outputs, tmp_path):
    dest = tmp_path / "both"

    transfer.download(target(), str(outputs), "*.txt", str(dest), quiet=True)

    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt"]


def test_path_that_matches_nothing_lists_the_remote_dir(target, outputs, tmp_path):
    dest = tmp_path / "dest"

    with pytest.raises(TransferError) as info:
        transfer.download(target(), str(outputs), ["a.txt", "nope/*.csv"], str(dest))

    message = str(info.value)
    assert "nope/*.csv" in message
    assert "a.txt" in message and "out/" in message and "notes.md" in message
    assert transfer.MANIFEST not in message
    assert "\n" not in message
    assert not dest.exists()
    assert not list(tmp_path.glob(".crimpl-download-*"))


def test_missing_remote_dir_is_reported(target, tmp_path):
    with pytest.raises(TransferError, match="does not exist"):
        transfer.download(target(), str(tmp_path / "nowhere"), "x", str(tmp_path / "dest"))


def test_overwriting_a_different_local_file_is_reported(target, outputs, tmp_path):
    dest = tmp_path / "dest"
    write(dest / "a.txt", "my local edits\n")
    write(dest / "b.txt", "b\n")  # identical: left alone, not reported

    report = transfer.download(target(), str(outputs), ["a.txt", "b.txt"], str(dest), quiet=True)

    assert report.replaced == [str(dest / "a.txt")]
    assert report.files_skipped == 1
    assert (dest / "a.txt").read_text() == "a\n"


def test_file_in_the_way_of_a_folder_stops_the_download_before_writing(target, outputs, tmp_path):
    dest = tmp_path / "dest"
    write(dest / "out", "a file where the folder goes\n")

    with pytest.raises(TransferError, match="in the way"):
        transfer.download(target(), str(outputs), ["a.txt", "out"], str(dest), quiet=True)

    assert not (dest / "a.txt").exists()


def test_link_escaping_the_destination_is_refused(target, outputs, tmp_path):
    os.symlink("/etc/passwd", outputs / "out" / "escape")
    dest = tmp_path / "dest"

    with pytest.raises(TransferError, match="refusing"):
        transfer.download(target(), str(outputs), "out", str(dest), quiet=True)

    assert not dest.exists()
    assert not list(tmp_path.glob(".crimpl-download-*"))


@pytest.mark.parametrize("how", ["client drops the connection", "server session is killed"])
def test_download_killed_midway_leaves_nothing_locally(connect, sshd, outputs, tmp_path, how):
    with open(outputs / "out" / "huge.bin", "wb") as handle:
        handle.truncate(300 * 2**20)  # bigger than the SSH window, so it cannot all be in flight
    conn = connect()
    dest = tmp_path / "dest"
    interrupt = cut_after_first_mib(conn, how, sshd)

    with pytest.raises(TransferError, match="nothing was written"):
        transfer.download(conn, str(outputs), "out", str(dest), quiet=True, callback=interrupt)

    assert not dest.exists()
    assert not list(tmp_path.glob(".crimpl-download-*"))
    # A new connection downloads normally afterwards.
    report = transfer.download(connect(), str(outputs), "out/x.dat", str(dest) + "/", quiet=True)
    assert report.files == ["out/x.dat"]


# --------------------------------------------------------------------------- local unpack


def tar_bytes(*members):
    """A tar archive built from ``(TarInfo, data)`` pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize("evil", [
    member("../escaped.txt"),
    member("/tmp/absolute.txt"),
    member("sub/../../escaped.txt"),
    member("link", tarfile.SYMTYPE, "/etc/passwd"),
    member("sub/link", tarfile.SYMTYPE, "../../escaped.txt"),
    member("hard", tarfile.LNKTYPE, "../escaped.txt"),
    member("device", tarfile.CHRTYPE),
], ids=lambda m: m.name)
def test_archive_entries_escaping_the_destination_are_refused(evil, tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()
    archive = tar_bytes((member("fine.txt"), b"ok"), (evil, b"" if evil.type != tarfile.REGTYPE else b"x"))

    with pytest.raises(TransferError, match="refusing"):
        transfer.safe_extract(archive, inside)

    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute.txt").exists()


@pytest.mark.parametrize("evil", [
    [member("a", tarfile.SYMTYPE, "l/.."), member("l", tarfile.SYMTYPE, ".")],
    [member("l", tarfile.SYMTYPE, "."), member("l/escaped.txt")],
], ids=["link chain", "write through a link"])
def test_archive_links_combined_to_escape_are_refused(evil, tmp_path):
    inside = tmp_path / "inside"
    inside.mkdir()

    with pytest.raises(TransferError, match="refusing"):
        transfer.safe_extract(tar_bytes(*[(m, b"") for m in evil]), inside)

    assert not (tmp_path / "escaped.txt").exists()


def test_safe_archive_unpacks_with_links_inside(tmp_path):
    archive = tar_bytes((member("sub/data.txt"), b"data"),
                        (member("sub/link", tarfile.SYMTYPE, "data.txt"), b""))

    members = transfer.safe_extract(archive, tmp_path)

    assert [m.name for m in members] == ["sub/data.txt", "sub/link"]
    assert (tmp_path / "sub" / "link").read_text() == "data"
