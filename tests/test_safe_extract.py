"""crimpl.transfer.safe_extract on in-memory tar streams.

The same hostile streams also arrive through a real sshd in test_transfer_hostile.py;
here each rule is pinned on its own, with the file system checked around it.
"""

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from crimpl.errors import TransferError
from crimpl.transfer import safe_extract
from hostile import climbing_links, entry, tar_bytes, tree_state


@pytest.fixture
def inside(tmp_path):
    """An empty folder to unpack into, with a neighbour that must stay untouched."""
    (tmp_path / "neighbour").mkdir()
    (tmp_path / "neighbour" / "file.txt").write_text("keep\n")
    folder = tmp_path / "inside"
    folder.mkdir()
    return folder


def unpack(folder, *entries):
    return safe_extract(io.BytesIO(tar_bytes(*entries)), folder)


@pytest.mark.parametrize("evil", [
    entry("../escaped.txt", data=b"x"),
    entry("/tmp/absolute.txt", data=b"x"),
    entry("sub/../../escaped.txt", data=b"x"),
    entry("link", tarfile.SYMTYPE, "/etc/passwd"),
    entry("sub/link", tarfile.SYMTYPE, "../../escaped.txt"),
    entry("hard", tarfile.LNKTYPE, "../escaped.txt"),
    entry("device", tarfile.CHRTYPE),
    entry("fifo", tarfile.FIFOTYPE),
], ids=lambda e: e[0].name)
def test_archive_entries_escaping_the_destination_are_refused(evil, inside):
    with pytest.raises(TransferError, match="refusing"):
        unpack(inside, entry("fine.txt", data=b"ok"), evil)

    assert not (inside.parent / "escaped.txt").exists()
    assert not Path("/tmp/absolute.txt").exists()


@pytest.mark.parametrize("evil", [
    [entry("a", tarfile.SYMTYPE, "l/.."), entry("l", tarfile.SYMTYPE, ".")],
    [entry("l", tarfile.SYMTYPE, "."), entry("a", tarfile.SYMTYPE, "l/..")],
    [entry("l", tarfile.SYMTYPE, "."), entry("l/escaped.txt")],
    [entry("l", tarfile.SYMTYPE, "."), entry("l", data=b"through the link")],
    [entry("l", tarfile.SYMTYPE, "."), entry("l", tarfile.DIRTYPE, mode=0o777)],
    [entry("a", tarfile.SYMTYPE, "a/..")],
], ids=["link chain", "link chain, link first", "write below a link", "file over a link",
        "folder over a link", "link through itself"])
def test_archive_links_combined_to_escape_are_refused(evil, inside):
    before = tree_state(inside.parent / "neighbour")

    with pytest.raises(TransferError, match="refusing"):
        unpack(inside, *evil)

    assert not (inside.parent / "escaped.txt").exists()
    assert tree_state(inside.parent / "neighbour") == before


def test_climbing_links_each_looking_like_dot_are_refused_at_the_second(inside):
    links, _top = climbing_links("sub", depth=3)

    with pytest.raises(TransferError, match="passes through the symlink 'sub/l'"):
        unpack(inside, *links)

    assert [p.name for p in (inside / "sub").iterdir()] == ["l"]


@pytest.mark.parametrize("same_name", [
    [entry("f", data=b"1"), entry("f", data=b"2")],
    [entry("f", data=b"1"), entry("./f", data=b"2")],
    [entry("x", data=b"1"), entry("x", tarfile.DIRTYPE)],
    [entry("x", tarfile.DIRTYPE), entry("x", data=b"1")],
    [entry("x", tarfile.DIRTYPE), entry("x", tarfile.DIRTYPE)],
], ids=["two files", "two spellings", "file then folder", "folder then file", "two folders"])
def test_two_entries_with_the_same_name_are_refused(same_name, inside):
    with pytest.raises(TransferError, match="same name"):
        unpack(inside, *same_name)


def test_nothing_is_ever_written_through_a_link_even_one_pointing_inside(inside):
    with pytest.raises(TransferError, match="not a folder"):
        unpack(inside, entry("real", tarfile.DIRTYPE), entry("alias", tarfile.SYMTYPE, "real"),
               entry("alias/x.txt", data=b"x"))

    assert list((inside / "real").iterdir()) == []


def test_safe_archive_unpacks_with_links_inside(inside):
    members = unpack(inside, entry("sub/data.txt", data=b"data"),
                     entry("sub/link", tarfile.SYMTYPE, "data.txt"),
                     entry("sub/deeper/up", tarfile.SYMTYPE, "../link"),
                     entry("top", tarfile.SYMTYPE, "sub/deeper/up"))

    assert [m.name for m in members] == ["sub/data.txt", "sub/link", "sub/deeper/up", "top"]
    assert (inside / "top").read_text() == "data"


def test_modes_are_kept_without_set_id_bits_and_folders_stay_open_until_moved(inside):
    members = unpack(inside, entry("./bin", tarfile.DIRTYPE, mode=0o555),
                     entry("./bin/tool", data=b"#!/bin/sh\n", mode=0o4755))

    assert {m.name: m.mode for m in members} == {"bin": 0o555, "bin/tool": 0o755}
    assert stat.S_IMODE((inside / "bin").stat().st_mode) == 0o700
    assert stat.S_IMODE((inside / "bin" / "tool").stat().st_mode) == 0o755
    assert os.access(inside / "bin", os.W_OK)


def test_entries_may_come_before_their_folder(inside):
    unpack(inside, entry("a/b/c.txt", data=b"c"), entry("a", tarfile.DIRTYPE, mode=0o750))

    assert (inside / "a" / "b" / "c.txt").read_text() == "c"


def test_the_folder_itself_as_a_file_is_refused(inside):
    with pytest.raises(TransferError, match="refusing"):
        unpack(inside, entry(".", data=b"x"))


def test_sparse_files_from_gnu_tar_unpack_whole(inside, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    with open(source / "sparse.bin", "wb") as handle:
        handle.write(b"start")
        handle.seek(4 * 2**20)
        handle.write(b"end")
    archive = subprocess.run(["tar", "-c", "-f", "-", "-S", "-H", "gnu", "-C", str(source), "sparse.bin"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert tar.getmember("sparse.bin").sparse  # the archive really stores it sparse

    safe_extract(io.BytesIO(archive), inside)

    assert (inside / "sparse.bin").read_bytes() == (source / "sparse.bin").read_bytes()
