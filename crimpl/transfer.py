"""Copy files to and from the server: one tar stream per direction, incremental, resumable.

Both functions take ``conn``: a :class:`fabric.Connection` to the server, or an
:class:`invoke.Context` for the local target, where the same shell commands run
through ``/bin/sh`` on this machine. Everything goes through ONE command per
operation on that one connection (see :func:`_open_stream`); the far side needs
only POSIX ``sh``, GNU ``tar``, ``find``, ``mv``, ``awk`` and ``ls``.

Upload protocol (one exec channel, one round trip before the data):

1. The remote command prints the manifest of ``remote_dir`` (``.crimpl-manifest``,
   written by the previous upload) and a ``find`` listing of the uploaded names,
   then waits for one line on stdin.
2. Locally, each file is compared with the manifest entry (size, mtime and mode;
   the sha256 in the manifest settles an mtime-only change), and the manifest
   entry with the listing (so a file changed or removed on the server is sent
   again). Unchanged: close the channel, done.
3. Otherwise ``go`` and a tar stream of the changed entries follow. The remote
   side extracts it into a fresh ``.crimpl-upload-*`` folder, then a script that
   came in the same stream moves the entries into place and puts the new
   manifest in place LAST. A connection lost before that leaves the old manifest,
   so the next upload re-checks everything against the listing; stale temporary
   folders are removed by the next upload. One upload per ``remote_dir`` at a time.

Download: one command checks that every path or glob matches, prints the totals
and streams ``tar c``; locally the stream is unpacked with :func:`safe_extract`
into a temporary folder beside the destination, and files are moved into place
with :func:`os.replace` only once the whole stream has arrived and the remote tar
exited 0.
"""

import filecmp
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fabric
import paramiko
import pathspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .errors import TransferError

MANIFEST = ".crimpl-manifest"
IGNORE_FILE = ".crimplignore"
#: Names starting with this are crimpl's own bookkeeping in ``remote_dir``.
RESERVED_PREFIX = ".crimpl-"
_UPLOAD_TMP_PREFIX = ".crimpl-upload-"
_DOWNLOAD_TMP_PREFIX = ".crimpl-download-"
_FINISH_SCRIPT = ".crimpl-finish"
_MISSING_STATUS = 66

# SSH channel tuning, measured in docs/benchmarks.md. Uploads are limited by the
# window sshd advertises (OpenSSH: 2 MiB, 32 KiB packets), which a client cannot
# change: at 40 ms round trip crimpl, cat|ssh, rsync and scp all send ~42 MiB/s,
# so tar over one exec channel costs nothing against ``cat FILE | ssh 'cat > FILE'``
# (tar adds 512 bytes per file) and we keep the single stream. For downloads we
# advertise the window: OpenSSH's 2 MiB caps cat|ssh at ~43 MiB/s there, while a
# 64 MiB window (paramiko buffers at most that much) took 260 MiB/s. Packets of
# 256 KiB instead of 32 KiB cut paramiko's per-packet Python work: on loopback
# 150-450 MB/s became 560-860 MB/s.
WINDOW_SIZE = 64 * 2**20
MAX_PACKET_SIZE = 256 * 2**10
#: Bytes per read or write of file data and of the SSH stream.
CHUNK = 2**20
#: Seconds without any progress on the channel before a transfer is abandoned.
IDLE_TIMEOUT = 300.0
#: Progress bars appear only for transfers that take longer than this (seconds).
DISPLAY_DELAY = 1.0
# Files per ``mv`` command in the remote finish script, well below ARG_MAX.
_MV_BATCH = 500

_CONNECTION_ERRORS = (OSError, EOFError, paramiko.SSHException)


@dataclass
class TransferReport:
    """What an :func:`upload` or :func:`download` did.

    :param files_sent: files and symlinks that crossed the connection.
    :param bytes_sent: bytes of file content that crossed it (tar headers not counted).
    :param files_skipped: files left alone because the other side already had them.
    :param replaced: local paths that a download overwrote with different content.
    :param files: the relative paths (relative to ``remote_dir``) that were moved.
    """

    files_sent: int = 0
    bytes_sent: int = 0
    files_skipped: int = 0
    replaced: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- streams


class _ChannelStream:
    """A remote command's stdin, stdout and exit status over one SSH exec channel."""

    def __init__(self, channel):
        self.channel = channel

    def send(self, data):
        # sendall slices what is left after each packet; on a memoryview that
        # slice is free, on bytes it copies the rest of the chunk every 32 KiB.
        self.channel.sendall(memoryview(data))

    def recv(self, size):
        return self.channel.recv(size)

    def close_stdin(self):
        self.channel.shutdown_write()

    def finish(self):
        """Wait for the command to end; return ``(exit status, stderr text)``.

        The status is -1 when the channel closed without one (connection lost).
        """
        while self.channel.recv(CHUNK):  # stdout must be drained for EOF to arrive
            pass
        err = []
        while data := self.channel.recv_stderr(CHUNK):
            err.append(data)
        if not self.channel.status_event.wait(IDLE_TIMEOUT):
            raise TimeoutError(f"no exit status within {IDLE_TIMEOUT:.0f} s")
        return self.channel.exit_status, b"".join(err).decode("utf-8", "replace")

    def close(self, abort=False):
        # Closing the channel ends the remote command too: its stdin sees EOF.
        self.channel.close()


class _ProcessStream:
    """The same interface for a local ``/bin/sh`` process (the local target)."""

    def __init__(self, script):
        # stderr goes to a file, not a pipe, so a chatty command cannot block on it.
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
        )

    def send(self, data):
        self.process.stdin.write(data)

    def recv(self, size):
        return self.process.stdout.read1(size)

    def close_stdin(self):
        self.process.stdin.close()

    def finish(self):
        while self.process.stdout.read1(CHUNK):
            pass
        status = self.process.wait(IDLE_TIMEOUT)
        self._stderr.seek(0)
        return status, self._stderr.read().decode("utf-8", "replace")

    def close(self, abort=False):
        if abort and self.process.poll() is None:
            self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:  # stdin of a process that already exited
                pass
        self.process.wait(IDLE_TIMEOUT)
        self._stderr.close()


class _opened:
    """Context manager that closes a stream, aborting the command if the block failed."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stream.close(abort=exc_type is not None)
        except _CONNECTION_ERRORS:
            if exc_type is None:
                raise
        return False


def _open_stream(conn, script):
    """Run ``script`` with ``sh`` on the target and return its byte stream.

    :param conn: a :class:`fabric.Connection` (one exec channel on its transport,
        opening the connection if needed) or an :class:`invoke.Context` (a local
        ``/bin/sh`` process).
    :param script: POSIX shell code.
    """
    # Connection subclasses Context, so it must be tested first.
    if isinstance(conn, fabric.Connection):
        conn.open()
        transport = conn.client.get_transport()
        channel = transport.open_session(window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE)
        channel.settimeout(IDLE_TIMEOUT)
        # Run through sh explicitly: the login shell may not be a POSIX shell.
        # Encoded here so file names that are not UTF-8 pass through unchanged.
        channel.exec_command(("sh -c " + shlex.quote(script)).encode("utf-8", "surrogateescape"))
        return _ChannelStream(channel)
    return _ProcessStream(script)


def _where(conn, remote_dir):
    """``host:remote_dir`` for messages."""
    host = conn.host if isinstance(conn, fabric.Connection) else "local"
    return f"{host}:{remote_dir}"


# --------------------------------------------------------------------------- progress


class _Progress:
    """Bytes and files done; a rich progress bar once a transfer has run for a second.

    :param callback: called as ``callback(bytes_done, bytes_total)`` on every advance.
    """

    def __init__(self, description, total_bytes, total_files, quiet=False, callback=None):
        self.description = description
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.callback = callback
        self.bytes = 0
        self.files = 0
        self.started = time.monotonic()
        self.console = None if quiet else Console()
        # Asked once: isatty() is a system call, and system calls are where a
        # busy paramiko thread makes this one wait for the GIL.
        self.display = self.console is not None and self.console.is_terminal
        self.bar = None
        self.task = None

    def advance(self, nbytes=0, nfiles=0):
        self.bytes += nbytes
        self.files += nfiles
        if self.callback is not None:
            self.callback(self.bytes, self.total_bytes)
        if self.bar is None:
            if not self.display or time.monotonic() - self.started < DISPLAY_DELAY:
                return
            self._start_bar()
        # Tar headers make the byte count run slightly past the content total.
        self.bar.update(self.task, completed=min(self.bytes, self.total_bytes or self.bytes),
                        files=self.files)

    def _start_bar(self):
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.bar.add_task(self.description, total=self.total_bytes or None,
                                      files=self.files, total_files=self.total_files)
        self.bar.start()

    def close(self):
        if self.bar is not None:
            self.bar.stop()


class _StreamWriter:
    """File-like object that tarfile writes into; sends to the stream and counts bytes."""

    def __init__(self, stream, progress):
        self.stream = stream
        self.progress = progress

    def write(self, data):
        self.stream.send(data)
        self.progress.advance(len(data))
        return len(data)


class _StreamReader:
    """File-like object that tarfile reads from; short reads are fine for tarfile.

    It takes everything the stream has buffered in one ``recv``: paramiko keeps
    received data in an array and deletes what is read from its front, so many
    small reads from a full 64 MiB window move the rest of it each time.
    """

    def __init__(self, stream, progress=None):
        self.stream = stream
        self.progress = progress
        self.data = b""
        self.pos = 0

    def read(self, size=CHUNK):
        if self.pos >= len(self.data):
            self.data = self.stream.recv(WINDOW_SIZE)
            self.pos = 0
            if self.progress is not None and self.data:
                self.progress.advance(len(self.data))
        size = size if size is not None and size >= 0 else len(self.data)
        chunk = self.data[self.pos:self.pos + size]
        self.pos += len(chunk)
        return chunk


# --------------------------------------------------------------------------- upload


@dataclass
class _Entry:
    """One local file, symlink or directory to upload."""

    path: str
    kind: str  # "f" file, "l" symlink, "d" directory
    size: int
    mtime: int
    mtime_ns: int
    mode: int
    link: str = ""


def upload(conn, sources, remote_dir, *, quiet=False, callback=None):
    """Copy local files and directories into ``remote_dir``, sending only what changed.

    Each source lands in ``remote_dir`` under its basename; directories are copied
    recursively with their layout, permission bits and symlinks (a source that is
    itself a symlink is followed). A ``.crimplignore`` file (gitignore syntax) in
    an uploaded directory excludes paths below that directory. Files deleted
    locally are not deleted on the server.

    :param conn: a :class:`fabric.Connection` or an :class:`invoke.Context` (local target).
    :param sources: a local path or a list of them.
    :param remote_dir: destination folder as the remote shell sees it (relative
        to the login directory, or absolute); created if missing.
    :param quiet: never show a progress bar.
    :param callback: optional ``callback(bytes_done, bytes_total)`` called as data is sent.
    :returns: a :class:`TransferReport`.
    :raises TransferError: if a source is missing (before anything is sent), or the
        copy failed; a failed upload can simply be retried.
    """
    names, entries = _scan_sources(sources)
    token = secrets.token_hex(6)
    script = _upload_script(remote_dir, names, _UPLOAD_TMP_PREFIX + token)
    report = TransferReport()
    try:
        with _opened(_open_stream(conn, script)) as stream:
            manifest, remote = _read_listing(stream)
            plan = _plan_upload(entries, manifest, remote, names)
            report.files_skipped = plan.skipped
            if not plan.send and not plan.chmod:
                # The remote side sees EOF instead of "go" and exits 0; no need to
                # wait a round trip for its status.
                return report
            stream.send(b"go\n")
            progress = _Progress(f"upload {remote_dir}", plan.bytes, len(plan.send),
                                 quiet=quiet, callback=callback)
            try:
                _send_tar(stream, plan, progress, _UPLOAD_TMP_PREFIX + token)
            finally:
                progress.close()
            stream.close_stdin()
            status, stderr = stream.finish()
    except (OSError, EOFError, paramiko.SSHException, tarfile.TarError) as exc:
        raise TransferError(
            f"upload to {_where(conn, remote_dir)} failed ({_describe(exc)}); "
            "retry to complete it"
        ) from exc
    if status != 0:
        raise TransferError(
            f"upload to {_where(conn, remote_dir)} failed "
            f"({_status_text(status, stderr)}); retry to complete it"
        )
    for rel, entry in plan.send:
        if entry.kind != "d":
            report.files_sent += 1
            report.bytes_sent += entry.size if entry.kind == "f" else 0
            report.files.append(rel)
    return report


def _scan_sources(sources):
    """Return ``(top-level names, {relative path: _Entry})`` for the sources.

    Checks every source before anything else, so a missing one is reported
    before a connection is even opened.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise TransferError("nothing to upload: no sources given")
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise TransferError(
            f"cannot upload {', '.join(missing)}: no such file or directory (nothing was sent)"
        )
    names, entries = [], {}
    for source in sources:
        name = os.path.basename(os.path.abspath(source))
        if name in names:
            raise TransferError(
                f"two sources are named {name!r}; they would land on the same path in remote_dir"
            )
        if name.startswith(RESERVED_PREFIX):
            raise TransferError(f"cannot upload {source}: names starting with "
                                f"{RESERVED_PREFIX!r} are reserved for crimpl")
        names.append(name)
        try:
            st = os.stat(source)  # a source that is a symlink is followed on purpose
            if stat.S_ISDIR(st.st_mode):
                entries[name] = _entry(source, st, "d")
                _walk(source, name, [], entries)
            elif stat.S_ISREG(st.st_mode):
                entries[name] = _entry(source, st, "f")
            else:
                raise TransferError(f"cannot upload {source}: not a regular file or directory")
        except OSError as exc:
            raise TransferError(f"cannot upload {exc.filename or source}: {exc.strerror} "
                                "(nothing was sent)") from exc
    return names, entries


def _entry(path, st, kind):
    return _Entry(
        path=path, kind=kind, size=st.st_size if kind == "f" else 0,
        mtime=int(st.st_mtime), mtime_ns=st.st_mtime_ns, mode=stat.S_IMODE(st.st_mode),
        link=os.readlink(path) if kind == "l" else "",
    )


def _walk(directory, rel_dir, specs, entries):
    """Add the entries below ``directory`` (relative path ``rel_dir``), honouring ignore files."""
    ignore_file = os.path.join(directory, IGNORE_FILE)
    if os.path.isfile(ignore_file):
        with open(ignore_file, encoding="utf-8", errors="surrogateescape") as handle:
            specs = specs + [(rel_dir, pathspec.GitIgnoreSpec.from_lines(handle))]
    with os.scandir(directory) as listing:
        children = sorted(listing, key=lambda e: e.name)
    for child in children:
        rel = f"{rel_dir}/{child.name}"
        st = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            kind = "d"
        elif stat.S_ISLNK(st.st_mode):
            kind = "l"
        elif stat.S_ISREG(st.st_mode):
            kind = "f"
        else:
            continue  # sockets, fifos and devices have no meaning on another machine
        if _ignored(rel, kind == "d", specs):
            continue  # an ignored directory is not entered, as in git
        entries[rel] = _entry(child.path, st, kind)
        if kind == "d":
            _walk(child.path, rel, specs, entries)


def _ignored(rel, is_dir, specs):
    # The deepest .crimplignore with an opinion wins, as with nested .gitignore files.
    for base, spec in reversed(specs):
        sub = rel[len(base) + 1:] + ("/" if is_dir else "")
        include = spec.check_file(sub).include
        if include is not None:
            return include
    return False


def _upload_script(remote_dir, names, tmp):
    d = shlex.quote(remote_dir)
    starts = " ".join(shlex.quote("./" + n) for n in names)
    return (
        f"set -e; mkdir -p -- {d}; cd -- {d}; "
        # Listing: manifest, NUL, then six NUL-terminated fields per path, then END.
        f"{{ cat {MANIFEST} 2>/dev/null || :; printf '\\0'; "
        f"find {starts} -printf '%y\\0%s\\0%T@\\0%m\\0%l\\0%p\\0' 2>/dev/null || :; "
        "printf 'END\\0'; }; "
        # EOF instead of "go": nothing to send.
        'IFS= read -r go || exit 0; [ "$go" = go ] || exit 0; '
        # Temporary folders of interrupted uploads; failure to remove one is harmless.
        f"rm -rf ./{_UPLOAD_TMP_PREFIX}* 2>/dev/null || :; mkdir {tmp}; "
        f"tar -x -p --no-same-owner -f - -C {tmp}; "
        f"exec sh {tmp}/{_FINISH_SCRIPT}"
    )


def _read_listing(stream):
    """Read the manifest and the ``find`` listing the upload command prints first.

    :returns: ``(manifest, remote)``: ``{rel: manifest entry}`` and
        ``{rel: (kind, size, mtime, mode, link)}``.
    """
    buf = bytearray()
    while True:
        data = stream.recv(CHUNK)
        if not data:
            status, stderr = stream.finish()
            raise TransferError(f"the server did not list remote_dir ({_status_text(status, stderr)})")
        buf += data
        if buf.endswith(b"\0END\0"):
            parsed = _parse_listing(bytes(buf))
            if parsed is not None:
                return parsed


def _parse_listing(data):
    head, _, rest = data.partition(b"\0")
    fields = rest.split(b"\0")[:-1]
    if len(fields) % 6 != 1 or fields[-1] != b"END":
        return None  # "END" was a symlink target: the listing continues
    try:
        manifest = json.loads(head.decode("utf-8", "surrogateescape"))["files"] if head else {}
    except (ValueError, KeyError, TypeError):
        manifest = {}  # unreadable manifest: every file is verified or sent again
    remote = {}
    for i in range(0, len(fields) - 1, 6):
        kind, size, mtime, mode, link, path = (
            f.decode("utf-8", "surrogateescape") for f in fields[i:i + 6])
        # %T@ is "seconds.fraction": parse as text, a float would round up.
        remote[path[2:]] = (kind, int(size), int(mtime.partition(".")[0]), int(mode, 8), link)
    return manifest, remote


@dataclass
class _Plan:
    send: list = field(default_factory=list)  # [(rel, _Entry)] in parent-first order
    skipped: int = 0
    bytes: int = 0
    chmod: list = field(default_factory=list)  # [(rel, mode)] existing remote directories
    remove: list = field(default_factory=list)  # remote paths of another type, removed first
    manifest: dict = field(default_factory=dict)  # entries kept from the old manifest
    remote: dict = field(default_factory=dict)


def _plan_upload(entries, manifest, remote, names):
    """Decide what to send; see the module docstring for the rules."""
    plan = _Plan(remote=remote)
    tops = set(names)
    # Keep manifest entries of other uploads, and of ours that still match the server.
    for rel, old in manifest.items():
        top = rel.split("/", 1)[0]
        if top not in tops or _matches(old, remote.get(rel)):
            plan.manifest[rel] = old
    for rel, entry in entries.items():
        have = remote.get(rel)
        if have is not None and have[0] != entry.kind:
            plan.remove.append(rel)
            have = None
        if entry.kind == "d":
            if have is None:
                plan.send.append((rel, entry))
            elif have[3] != entry.mode:
                plan.chmod.append((rel, entry.mode))
            plan.manifest[rel] = ["d", 0, 0, entry.mode, "", 0]
            continue
        if have is not None and _unchanged(entry, plan.manifest.get(rel), have):
            plan.skipped += 1
            continue
        plan.send.append((rel, entry))
        plan.bytes += entry.size
    return plan


def _matches(old, have):
    """Is the server's file still the one the manifest entry describes?"""
    if have is None or not isinstance(old, list) or len(old) != 6 or have[0] != old[0]:
        return False
    kind, size, mtime, mode, _digest, _ns = old
    if kind == "f":
        return (have[1], have[2], have[3]) == (size, mtime, mode)
    return True


def _unchanged(entry, old, have):
    """Can ``entry`` be skipped: is the server's copy verified equal to the local one?"""
    if entry.kind == "l":
        return have[4] == entry.link
    if old is None or old[0] != "f":
        return False  # not uploaded by crimpl (or no longer as uploaded): send it
    _kind, size, _mtime, mode, digest, mtime_ns = old
    if size != entry.size or mode != entry.mode:
        return False
    if mtime_ns == entry.mtime_ns:
        return True
    # Same size, different mtime (touched, regenerated, checked out again): the
    # content hash decides, so an unchanged file is not sent again.
    if _sha256(entry.path) != digest:
        return False
    old[5] = entry.mtime_ns  # remembered if a new manifest is written this time
    return True


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


def _send_tar(stream, plan, progress, tmp):
    """Write the changed entries, the finish script and the new manifest as one tar stream."""
    manifest = dict(plan.manifest)
    tar = _TarWriter(_StreamWriter(stream, progress))
    for rel, entry in plan.send:
        info = tarfile.TarInfo(rel)
        info.mtime = entry.mtime  # whole seconds: no pax header per file
        info.mode = entry.mode
        if entry.kind == "d":
            info.type = tarfile.DIRTYPE
            tar.add(info)
            continue
        if entry.kind == "l":
            info.type = tarfile.SYMTYPE
            info.linkname = entry.link
            tar.add(info)
            manifest[rel] = ["l", 0, 0, 0, entry.link, 0]
            progress.advance(nfiles=1)
            continue
        info.size = entry.size
        try:
            with open(entry.path, "rb") as handle:
                digest = tar.add(info, handle)
        except FileNotFoundError as exc:
            raise TransferError(f"{entry.path} disappeared while it was being uploaded; "
                                "upload again") from exc
        manifest[rel] = ["f", entry.size, entry.mtime, entry.mode, digest, entry.mtime_ns]
        progress.advance(nfiles=1)
    tar.add_bytes(_FINISH_SCRIPT, _finish_script(plan, tmp).encode("utf-8", "surrogateescape"))
    # The manifest travels last and is moved into place last (see the finish script).
    body = json.dumps({"version": 1, "files": manifest}, separators=(",", ":"))
    tar.add_bytes(MANIFEST, body.encode("ascii"))
    tar.close()


class _TarWriter:
    """A streaming tar writer: headers from :meth:`tarfile.TarInfo.tobuf`, data in big writes.

    ``tarfile``'s own stream mode appends every 16 KiB block to an immutable
    buffer, which made a 2,000-file upload spend most of its CPU copying bytes;
    here small pieces are gathered in a bytearray and large reads go out as is.
    """

    def __init__(self, out):
        self.out = out
        self.buf = bytearray()
        self.offset = 0

    def _emit(self, data):
        self.buf += data
        if len(self.buf) >= CHUNK:
            self._flush()

    def _flush(self):
        if self.buf:
            self.out.write(bytes(self.buf))
            self.offset += len(self.buf)
            self.buf = bytearray()

    def add(self, info, handle=None):
        """Write ``info`` and, for a regular file, ``info.size`` bytes of ``handle``.

        :returns: the sha256 hex digest of the data written, or None without data.
        """
        self._emit(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        if handle is None:
            return None
        digest = hashlib.sha256()
        remaining = info.size
        while remaining:
            data = handle.read(min(CHUNK, remaining))
            if not data:
                raise TransferError(f"{getattr(handle, 'name', 'a file')} shrank while it was being uploaded; "
                                    "upload again")
            digest.update(data)
            remaining -= len(data)
            if len(data) >= CHUNK // 4:
                self._flush()
                self.out.write(data)
                self.offset += len(data)
            else:
                self._emit(data)
        self._emit(b"\0" * (-info.size % tarfile.BLOCKSIZE))
        return digest.hexdigest()

    def add_bytes(self, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(time.time())
        self.add(info, io.BytesIO(data))

    def close(self):
        self._emit(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        self._emit(b"\0" * (-(self.offset + len(self.buf)) % tarfile.RECORDSIZE))
        self._flush()


def _finish_script(plan, tmp):
    """The shell script that moves the extracted entries from ``tmp`` into place.

    Only the highest new path of each subtree is moved (one rename moves a whole
    new directory), grouped per destination folder so that thousands of files
    cost a handful of ``mv`` processes.
    """
    q = shlex.quote
    lines = ["set -e"]
    for rel in plan.remove:
        lines.append(f"rm -rf -- {q(rel)}")
    moved_dirs = set()
    by_parent = {}
    for rel, entry in plan.send:
        parent = posixpath.dirname(rel)
        if _ancestors(parent, moved_dirs):
            continue  # inside a new directory that moves as a whole
        if entry.kind == "d":
            moved_dirs.add(rel)
        by_parent.setdefault(parent or ".", []).append(rel)
    for parent, rels in by_parent.items():
        for i in range(0, len(rels), _MV_BATCH):
            batch = " ".join(q(f"{tmp}/{rel}") for rel in rels[i:i + _MV_BATCH])
            lines.append(f"mv -f -t {q(parent)} -- {batch}")
    for rel, mode in plan.chmod:
        lines.append(f"chmod {mode:o} -- {q(rel)}")
    lines.append(f"mv -f -- {q(tmp + '/' + MANIFEST)} {MANIFEST}")
    lines.append(f"rm -rf -- {q(tmp)}")
    return "\n".join(lines) + "\n"


def _ancestors(path, candidates):
    """Is ``path`` or one of its ancestors in ``candidates``?"""
    while path:
        if path in candidates:
            return True
        path = posixpath.dirname(path)
    return False


# --------------------------------------------------------------------------- download


def download(conn, remote_dir, paths, local_dest, *, quiet=False, callback=None):
    """Copy files, directories or globs from ``remote_dir`` to ``local_dest``.

    If ``local_dest`` is an existing directory, ends with ``/``, or several files
    match, the files go inside it under their paths relative to ``remote_dir``.
    If exactly one file matches and ``local_dest`` is not a directory, that file
    is written as ``local_dest``. Nothing lands in ``local_dest`` until the whole
    stream has arrived; a local file overwritten with different content is listed
    in :attr:`TransferReport.replaced`.

    :param conn: a :class:`fabric.Connection` or an :class:`invoke.Context` (local target).
    :param remote_dir: folder on the server the paths are relative to.
    :param paths: a path or a list of paths relative to ``remote_dir``; ``*``, ``?``
        and ``[...]`` are expanded by the remote shell (``*`` skips dot files).
    :param local_dest: local file or directory to write to.
    :param quiet: never show a progress bar.
    :param callback: optional ``callback(bytes_done, bytes_total)`` called as data arrives.
    :returns: a :class:`TransferReport`.
    :raises TransferError: if a path matches nothing (the message lists what
        ``remote_dir`` holds), an entry would land outside the destination, or
        the connection failed; nothing partial is left locally.
    """
    patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise TransferError("nothing to download: no paths given")
    for pattern in patterns:
        parts = PurePosixPath(pattern).parts
        if not pattern or pattern.startswith("/") or ".." in parts:
            raise TransferError(
                f"download path {pattern!r} must be relative to remote_dir, without '..'"
            )
    dest = Path(local_dest)
    into_dir = os.fspath(local_dest).endswith(("/", os.sep)) or dest.is_dir()
    # Unpack on the destination's file system, so the final moves are renames:
    # inside the destination folder if it exists, else beside it.
    staging_parent = dest if dest.is_dir() else dest.parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=_DOWNLOAD_TMP_PREFIX, dir=staging_parent)
    report = TransferReport()
    try:
        members = _receive(conn, remote_dir, patterns, staging, quiet, callback)
        try:
            _move_into_place(members, staging, dest, into_dir, report)
        except OSError as exc:
            raise TransferError(f"cannot write the download into {dest} ({_describe(exc)})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _receive(conn, remote_dir, patterns, staging, quiet, callback):
    """Run the download command and unpack its stream into ``staging``; return the members."""
    where = f"{_where(conn, remote_dir)}"
    try:
        with _opened(_open_stream(conn, _download_script(remote_dir, patterns))) as stream:
            header = _read_line(stream)
            if header is None:
                status, stderr = stream.finish()
                raise _download_error(status, stderr, where, patterns)
            total_files, total_bytes = (int(x) for x in header.split())
            progress = _Progress(f"download {remote_dir}", total_bytes, total_files,
                                 quiet=quiet, callback=callback)
            try:
                members = safe_extract(
                    _StreamReader(stream, progress), staging,
                    on_member=lambda m: progress.advance(nfiles=0 if m.isdir() else 1))
            finally:
                progress.close()
            status, stderr = stream.finish()
    except TransferError:
        raise
    except (OSError, EOFError, paramiko.SSHException, tarfile.TarError) as exc:
        raise TransferError(f"download from {where} failed ({_describe(exc)}); "
                            "nothing was written, try again") from exc
    if status != 0:
        raise TransferError(f"download from {where} failed ({_status_text(status, stderr)}); "
                            "nothing was written")
    return members


def _read_line(stream):
    """Read the first line of stdout byte-exactly, leaving the rest for tarfile.

    The line is short and sent in one write, but it may share a read with the
    start of the tar stream, so the remainder is pushed back.
    """
    data = b""
    while b"\n" not in data:
        more = stream.recv(CHUNK)
        if not more:
            return None if not data else data.decode()
        data += more
    line, _, rest = data.partition(b"\n")
    if rest:
        stream.recv = _pushback(stream.recv, rest)
    return line.decode()


def _pushback(recv, pending):
    state = {"pending": pending}

    def read(size):
        if state["pending"]:
            chunk, state["pending"] = state["pending"][:size], state["pending"][size:]
            return chunk
        return recv(size)

    return read


_BRACKET = re.compile(r"\[(!?[A-Za-z0-9_.,+-]+)\]")


def _glob_word(pattern):
    """Return ``pattern`` as one shell word in which only ``*``, ``?`` and ``[...]`` glob."""
    out, literal, i = [], [], 0
    while i < len(pattern):
        char = pattern[i]
        bracket = _BRACKET.match(pattern, i) if char == "[" else None
        if char in "*?" or bracket:
            if literal:
                out.append(shlex.quote("".join(literal)))
                literal = []
            out.append(bracket.group(0) if bracket else char)
            i = bracket.end() if bracket else i + 1
        else:
            literal.append(char)
            i += 1
    if literal:
        out.append(shlex.quote("".join(literal)))
    # A "./" prefix keeps names that start with "-" from being read as options.
    return "./" + "".join(out)


def _download_script(remote_dir, patterns):
    words = [_glob_word(p) for p in patterns]
    checks = "".join(
        f'for p in {w}; do [ -e "$p" ] || [ -L "$p" ] || '
        f"{{ printf '%s\\n' {shlex.quote(p)} >&2; m=1; }}; break; done; "
        for w, p in zip(words, patterns)
    )
    joined = " ".join(words)
    return (
        f"cd -- {shlex.quote(remote_dir)} 2>/dev/null || "
        f"{{ echo CRIMPL-NODIR >&2; exit {_MISSING_STATUS}; }}; m=0; {checks}"
        f"if [ $m = 1 ]; then echo CRIMPL-LISTING >&2; ls -A1p >&2; exit {_MISSING_STATUS}; fi; "
        # Totals for the progress bar: entries that are not directories, and file bytes.
        f"find {joined} -printf '%y %s\\n' 2>/dev/null | "
        "awk '{ if ($1 != \"d\") n++; if ($1 == \"f\") b += $2 } "
        "END { printf \"%d %.0f\\n\", n, b }'; "
        # Hard links become plain files, so each entry unpacks on its own.
        f"exec tar -c -f - -H gnu --hard-dereference --exclude={MANIFEST} "
        f"--exclude='{_UPLOAD_TMP_PREFIX}*' -- {joined}"
    )


def _download_error(status, stderr, where, patterns):
    if status != _MISSING_STATUS:
        return TransferError(f"download from {where} failed ({_status_text(status, stderr)})")
    if "CRIMPL-NODIR" in stderr:
        return TransferError(f"download from {where} failed: the folder does not exist")
    missing_part, _, listing_part = stderr.partition("CRIMPL-LISTING\n")
    missing = [line for line in missing_part.splitlines() if line] or patterns
    names = [n for n in listing_part.splitlines() if n and not n.startswith(RESERVED_PREFIX)]
    if not names:
        holds = "it is empty"
    elif len(names) > 30:
        holds = f"it holds: {', '.join(names[:30])} and {len(names) - 30} more"
    else:
        holds = f"it holds: {', '.join(names)}"
    verb = "matches" if len(missing) == 1 else "match"
    return TransferError(f"{', '.join(missing)} {verb} nothing in {where}; {holds}")


class _TarFile(tarfile.TarFile):
    """TarFile that never changes ownership: files belong to whoever downloads them.

    (tarfile would call ``chown`` for every file when running as root.)
    """

    def chown(self, tarinfo, targetpath, numeric_owner):
        pass


def safe_extract(fileobj, directory, *, on_member=None):
    """Unpack a tar stream into ``directory``, refusing anything that would escape it.

    Refused, with :class:`TransferError`: absolute names, ``..`` components,
    names that pass through a symlink of the archive, symlinks that resolve
    outside ``directory`` (checked once everything is unpacked, so the order of
    entries cannot hide a chain of links), hard links, devices and fifos. These
    are tar's ways to write or point outside the destination; crimpl's own
    remote ``tar c`` never produces them. Ownership is dropped and set-id bits
    are cleared; other permission bits are kept, except that folders stay
    writable (0700) so that their files can be moved out; their modes are in
    the returned members. On an error, ``directory`` may hold part of the
    stream: unpack into a temporary folder.

    :param fileobj: object with ``read(size)``; read sequentially (``r|`` mode).
    :param directory: existing, empty folder to unpack into.
    :param on_member: called with each :class:`tarfile.TarInfo` as it is unpacked.
    :returns: the unpacked members, names normalised (no ``./`` prefix).
    :raises TransferError: on an entry that would land or point outside ``directory``.
    """
    members, links = [], set()

    def refuse(member, why):
        raise TransferError(f"refusing archive entry {member.name!r}: {why}")

    def check(member, _path):
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts:
            refuse(member, f"it would land outside {directory}")
        if not (member.isreg() or member.isdir() or member.issym()):
            refuse(member, "only files, folders and symlinks are accepted")
        normal = posixpath.normpath(name)
        parent = posixpath.dirname(normal)
        while parent:
            if parent in links:
                refuse(member, f"it is inside the symlink {parent!r}")
            parent = posixpath.dirname(parent)
        if member.issym():
            if member.linkname.startswith("/"):
                refuse(member, f"it links to the absolute path {member.linkname!r}")
            target = posixpath.normpath(posixpath.join(posixpath.dirname(normal), member.linkname))
            if target == ".." or target.startswith("../"):
                refuse(member, f"it links outside {directory}")
            links.add(normal)
        kept = member.replace(mode=member.mode & 0o777, uid=None, gid=None, uname=None,
                              gname=None, deep=False)
        members.append(kept)
        if on_member is not None:
            on_member(kept)
        return kept.replace(mode=0o700, deep=False) if kept.isdir() else kept

    # tarfile's stream copies its unread buffer on every read, so a small buffer
    # keeps 512-byte header reads cheap, while file data is copied in large pieces.
    with _TarFile.open(fileobj=fileobj, mode="r|", bufsize=64 * 1024, copybufsize=CHUNK,
                       errorlevel=2, encoding="utf-8", errors="surrogateescape") as tar:
        tar.extractall(directory, filter=check)
    root = os.path.realpath(directory)
    for member in members:
        member.name = posixpath.normpath(member.name)
        if member.issym():
            # Now that every link exists, resolve for real: a chain like
            # "a -> l/.." with "l -> ." passes the textual check above.
            resolved = os.path.realpath(os.path.join(root, member.name))
            if os.path.commonpath([resolved, root]) != root:
                refuse(member, f"it links outside {directory} (through other links)")
    return [m for m in members if m.name != "."]


def _move_into_place(members, staging, dest, into_dir, report):
    """Move the unpacked members from ``staging`` to ``dest``, checking every conflict first."""
    latest = {}
    for member in members:  # a name given twice (overlapping patterns): the last wins
        latest[member.name] = member
    files = [m for m in latest.values() if not m.isdir()]
    dirs = [m for m in latest.values() if m.isdir()]
    if not into_dir and len(files) == 1 and not dirs:
        targets = {files[0].name: dest}
    elif dest.exists() and not dest.is_dir():
        raise TransferError(f"cannot download into {dest}: it is a file and several "
                            "entries matched; give a directory")
    else:
        targets = {m.name: dest / m.name for m in latest.values()}
    in_the_way, checked = set(), {dest}
    for member in latest.values():
        target = targets[member.name]
        real_dir = target.is_dir() and not target.is_symlink()
        if member.isdir() != real_dir and (member.isdir() or real_dir) and os.path.lexists(target):
            in_the_way.add(str(target))  # a file where a folder goes, or the reverse
        if target == dest:
            continue
        # Folders on the way must be real folders: a symlink could lead out of dest.
        parent = target.parent
        while parent not in checked and parent != parent.parent:
            checked.add(parent)
            if os.path.lexists(parent) and (parent.is_symlink() or not parent.is_dir()):
                in_the_way.add(str(parent))
            parent = parent.parent
    if in_the_way:
        raise TransferError(f"cannot download into {dest}: {', '.join(sorted(in_the_way))} "
                            "is in the way (file versus folder); nothing was written")
    # A folder that does not exist locally yet moves as a whole, in one rename:
    # on a fresh destination thousands of files cost a handful of renames.
    moved, created = set(), []
    for name in sorted(latest):  # parents sort before their children
        member = latest[name]
        target = targets[name]
        inside_moved = _ancestors(posixpath.dirname(name), moved)
        if member.isdir():
            if inside_moved:
                created.append((target, member.mode))
            elif not os.path.lexists(target):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(os.path.join(staging, name), target)
                moved.add(name)
                created.append((target, member.mode))
            continue
        report.files_sent += 1
        report.bytes_sent += member.size if member.isfile() else 0
        report.files.append(name)
        if inside_moved:
            continue
        source = os.path.join(staging, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target):
            if _same(source, target):
                report.files_skipped += 1
                continue
            report.replaced.append(str(target))
        os.replace(source, target)
    # Modes of new folders last, so a read-only one does not block its files.
    for target, mode in reversed(created):
        target.chmod(mode)


def _same(a, b):
    """Are the two paths the same symlink, or regular files with equal content?"""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    return os.path.isfile(b) and filecmp.cmp(a, b, shallow=False)


# --------------------------------------------------------------------------- messages


def _describe(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _status_text(status, stderr):
    if status == -1:
        return "connection lost"
    lines = [line for line in stderr.strip().splitlines() if line]
    return f"exit {status}: {lines[-1]}" if lines else f"exit {status}"
