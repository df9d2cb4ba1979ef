"""Unpack a tar stream from the server without letting it write or point outside the destination.

Security-critical: the server is not trusted to send only what crimpl's own
``tar c`` would. Each entry is checked before anything is written for it, and
writing never follows a symlink:

- names are relative, without ``..``, and no name comes twice;
- only regular files, folders and symlinks are accepted: no hard links,
  devices or fifos;
- the folders on the way to an entry are opened one component at a time from
  the destination's descriptor with ``O_NOFOLLOW`` (``openat``), so a symlink
  or a file anywhere on the path stops the stream instead of being followed;
  files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and symlinks with
  ``symlinkat``, so nothing that exists already is ever written to;
- a symlink's target is relative, stays inside the destination when resolved
  from the link's own folder, and passes through no other symlink of the
  archive, whichever comes first in the stream: its textual resolution is then
  its real one, so chains such as ``l -> .``, ``u -> l/..`` cannot climb out;
- Python's own :func:`tarfile.data_filter` checks every symlink as well.
"""

import os
import posixpath
import shutil
import stat
import tarfile

from ..errors import TransferError
from .streams import CHUNK

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Added to Python in 3.10.12 and 3.11.4; the checks here do not rely on it.
_DATA_FILTER = getattr(tarfile, "data_filter", None)


def safe_extract(fileobj, directory, *, on_member=None):
    """Unpack a tar stream into ``directory``, refusing anything that could write or point outside it.

    Ownership is dropped and set-id bits are cleared; other permission bits are
    kept on files, while folders stay 0700 (so their files can be moved out);
    the folders' own modes are in the returned members. On an error,
    ``directory`` may hold part of the stream (never anything outside it):
    unpack into a temporary folder.

    :param fileobj: object with ``read(size)``; read sequentially (``r|`` mode).
    :param directory: existing, empty folder to unpack into.
    :param on_member: called with each :class:`tarfile.TarInfo` as it is unpacked.
    :returns: the unpacked members, names normalised (no ``./`` prefix).
    :raises TransferError: on an invalid or hostile entry (see the module docstring).
    """
    unpacker = _Unpacker(os.fspath(directory))
    try:
        with tarfile.open(fileobj=fileobj, mode="r|", bufsize=64 * 1024, errorlevel=2,
                          encoding="utf-8", errors="surrogateescape") as tar:
            for member in tar:
                kept = unpacker.add(tar, member)
                if kept is not None and on_member is not None:
                    on_member(kept)
        unpacker.set_folder_times()
    finally:
        unpacker.close()
    return unpacker.members


def _refuse(name, why):
    raise TransferError(f"refusing the download: the server sent an invalid or hostile archive "
                        f"entry {name!r} ({why}); nothing was written")


class _Unpacker:
    """The state of one extraction: what was written, and a descriptor of the last parent folder."""

    def __init__(self, directory):
        self.directory = directory
        self.root_fd = os.open(directory, _DIR_FLAGS)
        self.members = []
        self.kinds = {}  # normalised name -> "f", "d" or "l", for every entry seen
        self.links = set()
        self.through = {}  # a path some symlink's target passes through -> that symlink
        self.folder_times = []  # (name, mtime) of folders, set once their content is written
        self.parent_name, self.parent_fd = "", self.root_fd

    def close(self):
        if self.parent_fd != self.root_fd:
            os.close(self.parent_fd)
        os.close(self.root_fd)

    def add(self, tar, member):
        """Check and write one entry; return what was kept of it, or None for the folder itself."""
        name = _normal_name(member)
        kind = "d" if member.isdir() else "l" if member.issym() else "f" if member.isreg() else None
        if kind is None:
            _refuse(member.name, f"a {_type_name(member)}: only files, folders and symlinks are accepted")
        if name in self.kinds:
            _refuse(member.name, "a second entry with the same name")
        if name == ".":
            if kind != "d":
                _refuse(member.name, "the destination folder itself, as something else than a folder")
            self.kinds[name] = kind
            return None
        ancestor = posixpath.dirname(name)
        while ancestor:
            if self.kinds.get(ancestor, "d") != "d":
                _refuse(member.name, f"inside {ancestor!r}, which is not a folder")
            ancestor = posixpath.dirname(ancestor)
        if kind == "l":
            self._check_link(member, name)
            # A second opinion on where the link really points. For files and folders
            # the filter adds nothing to the checks here but a realpath per entry.
            if _DATA_FILTER is not None:
                try:
                    _DATA_FILTER(member, self.directory)
                except tarfile.FilterError as exc:
                    _refuse(member.name, str(exc))
        self.kinds[name] = kind
        parent, base = posixpath.split(name)
        parent_fd = self._open_parent(member.name, parent)
        if kind == "d":
            self._make_folder(member.name, parent_fd, base)
            self.folder_times.append((name, member.mtime))
        elif kind == "l":
            try:
                os.symlink(member.linkname, base, dir_fd=parent_fd)
            except FileExistsError:
                _refuse(member.name, "something of that name was unpacked already")
        else:
            self._write_file(tar, member, parent_fd, base)
        kept = member.replace(name=name, mode=member.mode & 0o777, uid=None, gid=None,
                              uname=None, gname=None, deep=False)
        self.members.append(kept)
        return kept

    def _check_link(self, member, name):
        target = member.linkname
        if not target:
            _refuse(member.name, "a symlink with an empty target")
        if target.startswith("/"):
            _refuse(member.name, f"a symlink to the absolute path {target!r}")
        if name in self.through:
            _refuse(member.name, f"a symlink that the symlink {self.through[name]!r} would pass through")
        self.links.add(name)
        # Resolve the target from the link's folder one component at a time. Each
        # path a further component is applied to must be a real folder, never a
        # link: then ".." means what it says, and the textual result is the real one.
        path = name.split("/")[:-1]
        for part in target.split("/"):
            if part in ("", "."):
                continue
            passed = "/".join(path)
            if passed in self.links:
                _refuse(member.name, f"a symlink whose target passes through the symlink {passed!r}")
            if passed:
                self.through.setdefault(passed, name)
            if part == "..":
                if not path:
                    _refuse(member.name, f"a symlink to {target!r}, outside the destination")
                path.pop()
            else:
                path.append(part)

    def _open_parent(self, name, parent):
        """Return a descriptor of ``parent``, creating missing folders, following no symlink."""
        if parent == self.parent_name:
            return self.parent_fd
        if self.parent_fd != self.root_fd:
            os.close(self.parent_fd)
        self.parent_name, self.parent_fd = "", self.root_fd
        fd = self.root_fd
        for part in parent.split("/") if parent else []:
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:  # ELOOP for a symlink, ENOTDIR for a file
                if fd != self.root_fd:
                    os.close(fd)
                _refuse(name, f"{parent!r} on its way is not a real folder ({exc.strerror})")
            if fd != self.root_fd:
                os.close(fd)
            fd = child
        self.parent_name, self.parent_fd = parent, fd
        return fd

    def _make_folder(self, name, parent_fd, base):
        try:
            os.mkdir(base, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            # Only a folder made earlier as the parent of an entry can be here.
            if not stat.S_ISDIR(os.stat(base, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                _refuse(name, "something of that name was unpacked already")

    def _write_file(self, tar, member, parent_fd, base):
        try:
            fd = os.open(base, _FILE_FLAGS, 0o600, dir_fd=parent_fd)
        except FileExistsError:
            _refuse(member.name, "something of that name was unpacked already")
        with open(fd, "wb") as out:
            if member.sparse is None:
                _copy_data(tar.fileobj, member, out)
            else:
                shutil.copyfileobj(tar.extractfile(member), out, CHUNK)
            out.flush()  # before the times: a later write would change them
            os.fchmod(fd, member.mode & 0o777)
            _set_times(member.name, member.mtime, fd)

    def set_folder_times(self):
        """Give the unpacked folders their modification times, now that nothing is added to them."""
        for name, mtime in self.folder_times:
            parent, base = posixpath.split(name)
            fd = os.open(base, _DIR_FLAGS, dir_fd=self._open_parent(name, parent))
            try:
                _set_times(name, mtime, fd)
            finally:
                os.close(fd)


def _copy_data(stream, member, out):
    """Copy a member's data straight from the tar stream, as tarfile's own extraction does.

    (``extractfile`` would copy every piece twice more on its way.)
    """
    stream.seek(member.offset_data)  # in a stream, a no-op: the data comes next
    remaining = member.size
    while remaining:
        data = stream.read(min(CHUNK, remaining))
        if not data:
            raise tarfile.ReadError("unexpected end of data")
        out.write(data)
        remaining -= len(data)


def _set_times(name, mtime, fd):
    try:
        os.utime(fd, (mtime, mtime))
    except (OverflowError, ValueError):
        _refuse(name, f"an invalid modification time {mtime!r}")


def _normal_name(member):
    name = member.name
    if not name or name.startswith("/"):
        _refuse(name, "an absolute or empty name")
    if ".." in name.split("/"):
        _refuse(name, "a name with '..', which would land outside the destination")
    return posixpath.normpath(name)


def _type_name(member):
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    return f"tar entry of type {member.type!r}"
