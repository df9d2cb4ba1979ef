"""Byte streams to a command on the server (or a local ``sh``), progress, and messages.

Every transfer runs ONE command on the target and talks to it through the
stream :func:`open_stream` returns: an SSH exec channel with a large window for a
:class:`fabric.Connection`, a ``/bin/sh`` process for an :class:`invoke.Context`.
"""

import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import fabric
import paramiko
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichProgress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..errors import TransferError

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

#: What a lost or failing connection raises, over SSH (paramiko) or a local pipe.
CONNECTION_ERRORS = (OSError, EOFError, paramiko.SSHException)


@dataclass
class TransferReport:
    """What an :func:`upload` or :func:`download` did.

    :param files_sent: files and symlinks that crossed the connection.
    :param bytes_sent: bytes of file content that crossed it (tar headers not counted).
    :param files_skipped: files left alone because the other side already had them.
    :param replaced: local paths that a download overwrote with different content.
    :param files: the relative paths (relative to ``remote_dir``) that were moved.
    :param files_linked: files an upload took from the server's store instead of sending them.
    :param bytes_linked: the bytes of those files.
    :param connections: SSH connections the call opened (0 when it ran on one already open,
        or on the local target).
    :param channels: SSH exec channels (remote commands) the call opened.
    :param refused: the line an upload's ``guard`` answered instead of ``ok`` (nothing was sent).
    :param then_output: what an upload's ``then`` printed, once the upload completed.
    :param then_status: the exit status of ``then``.
    """

    files_sent: int = 0
    bytes_sent: int = 0
    files_skipped: int = 0
    replaced: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    files_linked: int = 0
    bytes_linked: int = 0
    connections: int = 0
    channels: int = 0
    refused: str = ""
    then_output: str = ""
    then_status: int | None = None


# --------------------------------------------------------------------------- streams


class ChannelStream:
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

    def read_rest(self):
        """Read stdout until the command closes it; return the bytes."""
        out = bytearray()
        while data := self.channel.recv(CHUNK):
            out += data
        return bytes(out)

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


class ProcessStream:
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
        # Now, not when the buffer fills: a store upload waits for the answer to what it sent.
        self.process.stdin.flush()

    def recv(self, size):
        return self.process.stdout.read1(size)

    def close_stdin(self):
        self.process.stdin.close()

    def read_rest(self):
        """Read stdout until the command closes it; return the bytes."""
        return self.process.stdout.read()

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


class opened:
    """Context manager that closes a stream, aborting the command if the block failed."""

    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stream.close(abort=exc_type is not None)
        except CONNECTION_ERRORS:
            if exc_type is None:
                raise
        return False


def open_stream(conn, script):
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
        return ChannelStream(channel)
    return ProcessStream(script)


def location(conn, remote_dir):
    """``host:remote_dir`` for messages."""
    host = conn.host if isinstance(conn, fabric.Connection) else "local"
    return f"{host}:{remote_dir}"


# --------------------------------------------------------------------------- progress


class Progress:
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
        self.bar = RichProgress(
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


class StreamWriter:
    """File-like object that tarfile writes into; sends to the stream and counts bytes."""

    def __init__(self, stream, progress):
        self.stream = stream
        self.progress = progress

    def write(self, data):
        self.stream.send(data)
        self.progress.advance(len(data))
        return len(data)


class StreamReader:
    """File-like object that tarfile reads from; short reads are fine for tarfile.

    It takes everything the stream has buffered in one ``recv``: paramiko keeps
    received data in an array and deletes what is read from its front, so many
    small reads from a full 64 MiB window move the rest of it each time.

    :param pending: bytes already received from the stream, read first.
    """

    def __init__(self, stream, progress=None, pending=b""):
        self.stream = stream
        self.progress = progress
        self.data = pending
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


# --------------------------------------------------------------------------- messages


def describe_exception(exc):
    """One line for an exception in a message: its type and the last line of its text."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def status_text(status, stderr):
    """One line for a remote command's failure: its exit status and last line of stderr."""
    if status == -1:
        return "connection lost"
    lines = [line for line in stderr.strip().splitlines() if line]
    return f"exit {status}: {lines[-1]}" if lines else f"exit {status}"


def path_list(value, what: str) -> list:
    """Return ``value`` (a path or a list of paths) as a non-empty list of strings.

    :param what: the role of the paths in messages, e.g. ``"sources to upload"``.
    :raises TransferError: for anything else, or an empty list.
    """
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    try:
        paths = [os.fspath(p) for p in value or []]
    except TypeError:
        raise TransferError(f"{what} must be a path or a list of paths, not {value!r}") from None
    if not paths:
        raise TransferError(f"nothing to do: no {what} given")
    return paths
