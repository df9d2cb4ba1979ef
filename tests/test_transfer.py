"""crimpl.transfer against a real sshd on loopback, and against the local target.

The "remote" side of the sshd is this machine, so tests look at remote files
directly on disk. Every test that makes sense for both targets runs twice: over
SSH (a fabric Connection with the host key pinned) and with an invoke.Context.
"""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import invoke
import pytest

from crimpl import transfer
from crimpl.errors import TransferError
from sandbox import cut_after_first_mib, session_pids, wait_until


# --------------------------------------------------------------------------- fixtures


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


def test_an_upload_runs_its_then_step_once_complete_and_its_guard_can_stop_it(target, tmp_path):
    src = write(tmp_path / "input.txt", "data\n")
    remote = tmp_path / "remote"
    ran = tmp_path / "then-ran"
    conn = target()
    try:
        refused = transfer.upload(conn, [src], str(remote), quiet=True, guard="echo busy elsewhere",
                                  then=f"touch {ran}")
        assert refused.refused == "busy elsewhere"
        assert refused.files_sent == 0 and not (remote / "input.txt").exists() and not ran.exists()

        report = transfer.upload(conn, [src], str(remote), quiet=True, guard="echo ok",
                                 then=f"touch {ran}; pwd; echo to stderr >&2; exit 3")
        assert report.files_sent == 1 and (remote / "input.txt").read_text() == "data\n"
        assert ran.exists()
        # `then` runs from the login folder (here the test's), with its own status and output.
        assert report.then_status == 3
        assert report.then_output == f"{os.getcwd() if target is invoke.Context else Path.home()}\n"

        ran.unlink()
        again = transfer.upload(conn, [src], str(remote), quiet=True, then=f"touch {ran}; echo again")
        # Nothing to send: the step still runs, in the same command.
        assert again.files_sent == 0 and again.files_skipped == 1
        assert again.then_output == "again\n" and again.then_status == 0 and ran.exists()
    finally:
        close(conn)


@pytest.mark.parametrize("how", ["client drops the connection", "server sessions killed"])
def test_a_cut_upload_never_runs_its_then_step(connect, sshd, tmp_path, how):
    src = tmp_path / "src"
    with open(write(src / "big.bin"), "wb") as handle:
        handle.truncate(64 * 2**20)
    remote = tmp_path / "remote"
    ran = tmp_path / "then-ran"
    conn = connect()
    with pytest.raises(TransferError, match="retry"):
        transfer.upload(conn, [src], str(remote), quiet=True, then=f"touch {ran}",
                        callback=cut_after_first_mib(conn, how, sshd))
    wait_until(lambda: not session_pids(sshd.process.pid), timeout=30, what="the cut session to end")
    assert not ran.exists()
    assert not (remote / "src").exists()


def close(conn):
    """Close a fabric Connection; the local target has nothing to close."""
    if hasattr(conn, "close"):
        conn.close()


def test_a_file_that_grows_while_it_is_sent_is_refused_and_not_recorded(target, sshd, tmp_path):
    src = tmp_path / "src"
    write(src / "small.txt", "v1\n")
    remote = tmp_path / "remote"
    first = target()
    transfer.upload(first, [src], str(remote), quiet=True)
    close(first)
    manifest_before = (remote / transfer.MANIFEST).read_bytes()
    growing = write(src / "growing.log", os.urandom(4 * 2**20))
    appended = []

    def append_once_sending(done, total):
        if done > 2**20 and not appended:
            with open(growing, "ab") as handle:
                handle.write(b"one more line\n")
            appended.append(done)

    conn = target()
    with pytest.raises(TransferError, match="growing.log changed while it was being sent; upload again"):
        transfer.upload(conn, [src], str(remote), quiet=True, callback=append_once_sending)

    assert appended
    assert not (remote / "src" / "growing.log").exists()
    assert (remote / transfer.MANIFEST).read_bytes() == manifest_before
    close(conn)
    wait_until(lambda: not session_pids(sshd.process.pid), timeout=30, what="old session ends")
    retry = transfer.upload(target(), [src], str(remote), quiet=True)
    assert retry.files == ["src/growing.log"]
    assert (remote / "src" / "growing.log").read_bytes() == growing.read_bytes()


def finishes(action, within=60):
    """Run ``action`` in a thread; return its result, failing (not hanging) if it does not end."""
    outcome = {}

    def run():
        try:
            outcome["value"] = action()
        except BaseException as exc:  # handed back to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("manifest", [
    b'{"version":1,"files":{}}\0{"more":1}',
    b"\0",
    b"not json at all",
    b"\xff\xfe\x00garbage",
    b'{"files": null}',
    b"[1, 2, 3]",
    b'{"files": [1, 2]}',
    b'{"files": {"src/a.txt": "f"}}',
    b'{"files": {"src/a.txt": ["f", "2", 0, 420, "x", 0]}}',
    b"[" * 100_000,
], ids=["NUL inside", "only a NUL", "not JSON", "not UTF-8", "files null", "a list",
        "files a list", "entry a string", "size a string", "nested too deep"])
def test_a_malformed_manifest_on_the_server_counts_as_none(target, tmp_path, manifest):
    src = tmp_path / "src"
    write(src / "a.txt", "a\n")
    write(src / "b.txt", "b\n")
    remote = tmp_path / "remote"
    transfer.upload(target(), [src], str(remote), quiet=True)
    (remote / transfer.MANIFEST).write_bytes(manifest)

    report = finishes(lambda: transfer.upload(target(), [src], str(remote), quiet=True))

    assert sorted(report.files) == ["src/a.txt", "src/b.txt"]  # verified by sending again
    files = json.loads((remote / transfer.MANIFEST).read_text())["files"]
    assert files["src/a.txt"][4] == hashlib.sha256(b"a\n").hexdigest()
    assert transfer.upload(target(), [src], str(remote), quiet=True).files_sent == 0


@pytest.mark.parametrize("sources", [None, 5, [None]], ids=["None", "a number", "a list with None"])
def test_sources_that_are_not_paths_are_a_one_line_error(sources, tmp_path):
    with pytest.raises(TransferError, match="upload") as info:
        transfer.upload(invoke.Context(), sources, str(tmp_path / "remote"))

    assert "\n" not in str(info.value)
    assert not (tmp_path / "remote").exists()


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


def test_glob_matches_land_under_their_basenames(target, outputs, tmp_path):
    dest = tmp_path / "dest"

    report = transfer.download(target(), str(outputs), "out/*.dat", str(dest) + "/", quiet=True)

    assert sorted(report.files) == ["out/x.dat", "out/y.dat"]
    assert sorted(p.name for p in dest.iterdir()) == ["x.dat", "y.dat"]
    assert (dest / "x.dat").read_text() == "x\n"


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
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "notes.md", "sub"]
    assert (dest / "sub" / "z.dat").read_text() == "z\n"


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

    assert [p.name for p in dest.iterdir()] == ["x.dat"]
    assert (dest / "x.dat").read_text() == "x\n"


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


# --------------------------------------------------------------------------- where downloads land


def test_a_trailing_slash_on_a_source_downloads_its_contents(target, outputs, tmp_path):
    dest = tmp_path / "out"

    report = transfer.download(target(), str(outputs), "out/", str(dest) + "/", quiet=True)

    assert snapshot(dest) == snapshot(outputs / "out")  # out/<files>, not out/out/...
    assert sorted(report.files) == ["out/sub/z.dat", "out/x.dat", "out/y.dat"]


def test_contents_merge_into_an_existing_directory(target, outputs, tmp_path):
    dest = tmp_path / "results"
    write(dest / "mine.txt", "local\n")

    transfer.download(target(), str(outputs), "out/", str(dest), quiet=True)

    assert sorted(p.name for p in dest.iterdir()) == ["mine.txt", "sub", "x.dat", "y.dat"]


def test_a_directory_without_trailing_slash_lands_under_its_basename(target, outputs, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()

    transfer.download(target(), str(outputs), "out/sub", str(dest), quiet=True)

    assert [p.name for p in dest.iterdir()] == ["sub"]
    assert (dest / "sub" / "z.dat").read_text() == "z\n"


def test_a_destination_ending_with_a_slash_is_a_directory_created_if_missing(target, outputs, tmp_path):
    dest = tmp_path / "new" / "folder"

    transfer.download(target(), str(outputs), "a.txt", str(dest) + "/", quiet=True)

    assert (dest / "a.txt").read_text() == "a\n"


def test_one_file_to_a_missing_name_without_slash_is_written_as_that_file(target, outputs, tmp_path):
    dest = tmp_path / "results"

    transfer.download(target(), str(outputs), "out/x.dat", str(dest), quiet=True)

    assert dest.read_text() == "x\n"


def test_overlapping_paths_that_land_in_the_same_place_are_downloaded_once(target, outputs, tmp_path):
    dest = tmp_path / "dest"

    report = transfer.download(target(), str(outputs), ["*.txt", "a.txt", "out/", "out/x.dat"],
                               str(dest) + "/", quiet=True)

    assert sorted(report.files) == ["a.txt", "b.txt", "out/sub/z.dat", "out/x.dat", "out/y.dat"]
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt", "sub", "x.dat", "y.dat"]


@pytest.mark.parametrize("paths, error", [
    (["out/x.dat", "x/x.dat"], "both land on x.dat"),
    (["out/", "x/"], "both land on x.dat"),
    (["out", "out/x.dat"], "overlap"),
], ids=["two files", "two folders' contents", "a folder and a file in it"])
def test_paths_that_would_land_on_the_same_name_are_refused(target, outputs, tmp_path, paths, error):
    write(outputs / "x" / "x.dat", "another x\n")
    dest = tmp_path / "dest"

    with pytest.raises(TransferError, match=error):
        transfer.download(target(), str(outputs), paths, str(dest) + "/", quiet=True)

    assert not dest.exists()


@pytest.mark.parametrize("paths", [None, 5, []], ids=["None", "a number", "empty"])
def test_paths_that_are_not_paths_are_a_one_line_error(paths, outputs, tmp_path):
    with pytest.raises(TransferError, match="download") as info:
        transfer.download(invoke.Context(), str(outputs), paths, str(tmp_path / "dest"))

    assert "\n" not in str(info.value)


def test_a_failed_download_removes_the_folders_it_created(target, outputs, tmp_path):
    write(tmp_path / "keep" / "mine.txt", "mine\n")

    with pytest.raises(TransferError, match="nope.txt"):
        transfer.download(target(), str(outputs), "nope.txt", str(tmp_path / "new" / "deeper" / "dest") + "/")
    with pytest.raises(TransferError, match="nope.txt"):
        transfer.download(target(), str(outputs), "nope.txt", str(tmp_path / "keep" / "sub" / "file.txt"))

    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "crimpl-home") == ["keep", "remote"]
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["mine.txt"]


# --------------------------------------------------------------------------- a killed download

KILLABLE_DOWNLOAD = """
import getpass, sys, threading
from pathlib import Path
from crimpl import hostkeys, ssh, transfer

port, key, host_key, remote, dest, ready = sys.argv[1:]
conn = ssh.connection("127.0.0.1", getpass.getuser(), key, "test-sshd",
                      expected_key=hostkeys.key_from_line(host_key), port=int(port))

def hold_once_a_partial_file_exists(done, total):
    if any(p.stat().st_size for p in Path(dest).glob(".crimpl-download-*/out/huge.bin")):
        Path(ready).touch()
        threading.Event().wait()  # stay mid-download until the test kills this process

transfer.download(conn, remote, "out", dest, quiet=True, callback=hold_once_a_partial_file_exists)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_download_shows_nothing_and_the_next_one_cleans_up(sshd, connect, outputs, tmp_path, sig):
    with open(outputs / "out" / "huge.bin", "wb") as handle:
        handle.truncate(300 * 2**20)
    dest = tmp_path / "dest"
    write(dest / "mine.txt", "local\n")
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_DOWNLOAD, str(sshd.port), str(sshd.client_key),
         sshd.host_public, str(outputs), str(dest), str(ready)],
        cwd=Path(__file__).resolve().parents[1])
    try:
        wait_until(lambda: ready.exists() or process.poll() is not None, timeout=60,
                   what="a partial file in the staging folder")
        assert process.poll() is None, "the download ended before it could be killed"
    finally:
        process.send_signal(sig)
        process.wait(30)

    assert [p.name for p in dest.iterdir() if not p.name.startswith(".")] == ["mine.txt"]
    assert list(dest.glob(".crimpl-download-*/out/huge.bin"))  # what the kill left behind, hidden
    (outputs / "out" / "huge.bin").unlink()

    report = transfer.download(connect(), str(outputs), "out", str(dest), quiet=True)

    assert sorted(p.name for p in dest.iterdir()) == ["mine.txt", "out"]
    assert sorted(report.files) == ["out/sub/z.dat", "out/x.dat", "out/y.dat"]
