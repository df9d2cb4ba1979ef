"""Download: one command lists what the paths match and streams ``tar c``; files move into place last.

Protocol (one exec channel, one round trip before the data):

1. The remote command checks that every path or glob matches (else it lists
   ``remote_dir`` and exits), prints the totals for the progress bar, then what
   each path expanded to, and starts ``tar c`` reading the names to send from
   its stdin.
2. Locally, the expansions are checked for overlaps and collisions in the
   destination; the exact names to send go back, each once.
3. The stream is unpacked with :func:`safe_extract` into a hidden staging folder
   on the destination's file system; entries are moved into place with
   :func:`os.replace` only once the whole stream has arrived and the remote tar
   exited 0. A staging folder left by a killed download is removed by the next
   download to the same place.
"""

import filecmp
import os
import posixpath
import re
import shlex
import shutil
import socket
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import TransferError
from ..ssh import counted
from .safe_extract import safe_extract
from .streams import (
    CHUNK,
    CONNECTION_ERRORS,
    Progress,
    StreamReader,
    TransferReport,
    describe_exception,
    location,
    open_stream,
    opened,
    path_list,
    status_text,
)
from .upload import MANIFEST, RESERVED_PREFIX, UPLOAD_TMP_PREFIX, ancestors

_DOWNLOAD_TMP_PREFIX = ".crimpl-download-"
# Staging folders are named PREFIX + "<host>-<pid>-<random>", so the next download
# can tell which ones belong to a process of this machine that is gone.
_STAGING_NAME = re.compile(re.escape(_DOWNLOAD_TMP_PREFIX) + r"(?P<host>.*)-(?P<pid>[0-9]+)-[a-z0-9_]+")
_MISSING_STATUS = 66
# Longest first line (the totals) the download command prints.
_MAX_HEADER = 4096


def download(conn, remote_dir, paths, local_dest, *, quiet=False, callback=None):
    """Copy files, directories or globs from ``remote_dir`` to ``local_dest``.

    Where things land, after ``cp -r`` and ``rsync -r``:

    - ``local_dest`` is a directory if it ends with ``/`` (created if missing)
      or is an existing directory;
    - otherwise, if exactly one file (or symlink) is downloaded, it is written as
      ``local_dest``; if a directory or several entries are downloaded,
      ``local_dest`` is a directory, created if missing;
    - inside the directory, each path lands under its basename: ``out/x.dat`` as
      ``local_dest/x.dat``, the directory ``out/sub`` as ``local_dest/sub/...``;
    - a path ending with ``/`` (or ``.``) means the directory's contents:
      ``download(conn, root, "results/", "results/")`` puts ``results/a.txt`` of
      the server at ``results/a.txt`` locally, not ``results/results/a.txt``;
    - two paths that would land on the same local name are refused, before
      anything is written.

    Nothing lands in ``local_dest`` until the whole stream has arrived, and
    nothing appears there under a visible name before that; a local file
    overwritten with different content is listed in :attr:`TransferReport.replaced`.

    :param conn: a :class:`fabric.Connection` or an :class:`invoke.Context` (local target).
    :param remote_dir: folder on the server the paths are relative to.
    :param paths: a path or a list of paths relative to ``remote_dir``; ``*``, ``?``
        and ``[...]`` are expanded by the remote shell (``*`` skips dot files).
    :param local_dest: local file or directory to write to.
    :param quiet: never show a progress bar.
    :param callback: optional ``callback(bytes_done, bytes_total)`` called as data arrives.
    :returns: a :class:`TransferReport`; its ``files`` are relative to ``remote_dir``;
        ``connections`` and ``channels`` count what it opened.
    :raises TransferError: if a path matches nothing (the message lists what
        ``remote_dir`` holds), the server sends an entry that would land or point
        outside the destination, or the connection failed. Nothing partial is
        left locally, nor the folders created for ``local_dest``.
    """
    with counted() as trips:
        report = _download(conn, remote_dir, paths, local_dest, quiet, callback)
    report.connections, report.channels = trips.connections, trips.channels
    return report


def _download(conn, remote_dir, paths, local_dest, quiet, callback):
    """:func:`download`."""
    patterns = _patterns(paths)
    dest = Path(local_dest)
    into_dir = os.fspath(local_dest).endswith(("/", os.sep)) or dest.is_dir()
    # Unpack on the destination's file system, so the final moves are renames:
    # inside the destination folder if it is one, else beside it.
    staging_parent = dest if into_dir else dest.parent
    created = _make_folders(staging_parent)
    report = TransferReport()
    try:
        staging = _new_staging(staging_parent)
        try:
            members, requests = _receive(conn, remote_dir, patterns, staging, quiet, callback)
            single = (not into_dir and len(requests) == 1 and not requests[0].contents
                      and len(members) == 1 and not members[0].isdir())
            landings = _landings(members, requests)
            try:
                _move_into_place(members, landings, staging, dest, single, report)
            except OSError as exc:
                raise TransferError(f"cannot write the download into {dest} "
                                    f"({describe_exception(exc)})") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:  # something else put a file there meanwhile: keep it
                break
        raise
    return report


def _patterns(paths):
    """Check the paths given to :func:`download` and return them as a list of strings."""
    patterns = path_list(paths, "paths to download")
    for pattern in patterns:
        parts = PurePosixPath(pattern).parts
        if not pattern or pattern.startswith("/") or ".." in parts:
            raise TransferError(
                f"download path {pattern!r} must be relative to remote_dir, without '..'"
            )
    return patterns


def _make_folders(folder):
    """Create ``folder`` and its missing parents; return the ones created, outermost first."""
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    for index, path in enumerate(missing):
        try:
            path.mkdir()
        except OSError as exc:
            for made in reversed(missing[:index]):
                made.rmdir()
            raise TransferError(f"cannot create the folder {path} to download into "
                                f"({exc.strerror})") from exc
    return missing


def _new_staging(folder):
    """Make a hidden staging folder in ``folder``, after removing stale ones."""
    try:
        _remove_stale_staging(folder)
        return tempfile.mkdtemp(prefix=f"{_DOWNLOAD_TMP_PREFIX}{_host()}-{os.getpid()}-", dir=folder)
    except OSError as exc:
        raise TransferError(f"cannot write into {folder} ({exc.strerror})") from exc


def _host():
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _remove_stale_staging(folder):
    """Remove the staging folders that processes of this machine, now gone, left in ``folder``."""
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.name.startswith(_DOWNLOAD_TMP_PREFIX)]
    for name in names:
        match = _STAGING_NAME.fullmatch(name)
        if match and match["host"] == _host() and not _alive(int(match["pid"])):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@dataclass
class _Request:
    """One path the server's shell expanded a download path to.

    :param pattern: the path as given to :func:`download`.
    :param raw: the expansion, byte for byte, as it goes back to ``tar``.
    :param rel: the expansion normalised, relative to ``remote_dir`` (``.`` for itself).
    :param contents: the pattern ended with ``/`` or ``/.``: the folder's contents land,
        not the folder.
    """

    pattern: str
    raw: bytes
    rel: str
    contents: bool

    def landing(self, name):
        """Where the archive entry ``name`` lands, relative to the destination ("" for itself)."""
        if name == self.rel:
            suffix = ""
        elif self.rel == ".":
            suffix = name
        else:
            suffix = name[len(self.rel) + 1:]
        base = "" if self.contents else posixpath.basename(self.rel)
        return posixpath.join(base, suffix) if suffix else base


def _receive(conn, remote_dir, patterns, staging, quiet, callback):
    """Run the download command and unpack its stream into ``staging``.

    :returns: ``(members, requests)``: the unpacked entries and the :class:`_Request` sent.
    """
    where = location(conn, remote_dir)
    try:
        with opened(open_stream(conn, _download_script(remote_dir, patterns))) as stream:
            answer = _read_answer(stream, len(patterns), where)
            if answer is None:
                status, stderr = stream.finish()
                raise _download_error(status, stderr, where, patterns)
            (total_files, total_bytes), expansions, rest = answer
            requests = _requests(patterns, expansions, where)
            try:
                stream.send(b"".join(r.raw + b"\0" for r in requests))
                stream.close_stdin()
            except CONNECTION_ERRORS:
                pass  # the command ended already: what it sent is read and judged below
            progress = Progress(f"download {remote_dir}", total_bytes, total_files,
                                quiet=quiet, callback=callback)
            try:
                members = safe_extract(
                    StreamReader(stream, progress, pending=rest), staging,
                    on_member=lambda m: progress.advance(nfiles=0 if m.isdir() else 1))
            finally:
                progress.close()
            status, stderr = stream.finish()
    except TransferError:
        raise
    except (*CONNECTION_ERRORS, tarfile.TarError) as exc:
        raise TransferError(f"download from {where} failed ({describe_exception(exc)}); "
                            "nothing was written, try again") from exc
    if status != 0:
        raise TransferError(f"download from {where} failed ({status_text(status, stderr)}); "
                            "nothing was written")
    return members, requests


def _read_answer(stream, npatterns, where):
    """Read what the download command prints before the data.

    :returns: ``((files, bytes), [[expansion, ...] per pattern], bytes read past the
        answer)``, or None if the command ended before answering.
    :raises TransferError: if the answer is malformed.
    """
    data, totals = b"", None
    while True:
        more = stream.recv(CHUNK)
        if not more:
            if data:
                raise _malformed(where, "it ended early")
            return None
        data += more
        if totals is None:
            line, newline, rest = data.partition(b"\n")
            if not newline:
                if len(data) > _MAX_HEADER or b"\0" in data:
                    raise _malformed(where, "no totals line")
                continue
            totals = _totals(line, where)
            data = rest
            more = rest
        # The answer ends with an empty field after the last expansion ("\0\0");
        # look for the end only when it can have arrived.
        if b"\0\0" in data[-len(more) - 1:]:
            parsed = _expansions(data, npatterns)
            if parsed is not None:
                return (totals, *parsed)


def _totals(line, where):
    totals = line.split()
    if len(totals) != 2 or not all(t.isdigit() for t in totals):
        shown = line[:60].decode("utf-8", "replace")
        raise _malformed(where, f"{shown!r} instead of the totals")
    return int(totals[0]), int(totals[1])


def _expansions(data, npatterns):
    """Split ``data`` into one list of expansions per pattern; None until all have arrived."""
    groups, current, used = [], [], 0
    for field in data.split(b"\0")[:-1]:  # the last one is not terminated yet
        used += len(field) + 1
        if field:
            current.append(field)
            continue
        groups.append(current)
        current = []
        if len(groups) == npatterns:
            return groups, data[used:]
    return None


def _malformed(where, what):
    return TransferError(f"download from {where} failed: the server's answer is malformed ({what}); "
                         "does a shell startup file on the server print to standard output?")


def _requests(patterns, expansions, where):
    """Turn the server's expansions into the list of paths to ask for, each once.

    A path inside another one that lands in the same place is dropped (asked for
    with the outer one); one that would land elsewhere, or two paths landing on
    the same local name, are refused before anything is transferred.
    """
    requests = {}
    for pattern, group in zip(patterns, expansions):
        contents = pattern.endswith("/") or pattern == "." or pattern.endswith("/.")
        globbed = any(char in pattern for char in "*?[")
        for raw in group:
            text = raw.decode("utf-8", "surrogateescape")
            if globbed and posixpath.basename(text) in (".", ".."):
                continue  # some shells' ".*" matches "." and ".."
            rel = posixpath.normpath(text)
            if not text.startswith("./") or rel == ".." or rel.startswith("../"):
                raise _malformed(where, f"{text!r} is not a path inside the folder")
            request = _Request(pattern, raw, rel, contents)
            known = requests.setdefault(rel, request)
            if known.contents != request.contents:
                raise _overlap(known, request)
    kept = []
    for rel, request in requests.items():
        outer = _outer(rel, requests)
        if outer is None:
            kept.append(request)
        elif outer.landing(rel) != request.landing(rel):
            raise _overlap(outer, request)
    landed = {}
    for request in kept:
        if not request.contents:
            landing = request.landing(request.rel)
            if landing in landed:
                raise TransferError(f"{landed[landing].rel} and {request.rel} would both land on "
                                    f"{landing}; download them separately")
            landed[landing] = request
    return kept


def _outer(rel, requests):
    """The nearest request strictly containing ``rel``, or None."""
    if rel == ".":
        return None
    parent = posixpath.dirname(rel)
    while parent:
        if parent in requests:
            return requests[parent]
        parent = posixpath.dirname(parent)
    return requests.get(".")


def _overlap(outer, inner):
    return TransferError(f"download paths {outer.pattern!r} and {inner.pattern!r} overlap "
                         f"({inner.rel} is in both) and would land in different places; "
                         "download them separately")


def _landings(members, requests):
    """Map each unpacked entry's name to where it lands, relative to the destination.

    The folder of a contents request (``results/``) is the destination itself and
    is left out.

    :raises TransferError: for an entry that was not asked for (a hostile server),
        or two entries landing on the same name.
    """
    by_rel = {r.rel: r for r in requests}
    landings, seen = {}, {}
    for member in members:
        request = by_rel.get(member.name) or _outer(member.name, by_rel)
        if request is None:
            raise TransferError(f"refusing the download: the server sent {member.name!r}, "
                                "which was not asked for; nothing was written")
        landing = request.landing(member.name)
        if not landing:
            continue
        if landing in seen:
            raise TransferError(f"{seen[landing]} and {member.name} would both land on {landing}; "
                                "download them separately; nothing was written")
        seen[landing] = member.name
        landings[member.name] = landing
    return landings


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
    expansions = "".join(f"for p in {w}; do printf '%s\\0' \"$p\"; done; printf '\\0'; "
                         for w in words)
    return (
        f"cd -- {shlex.quote(remote_dir)} 2>/dev/null || "
        f"{{ echo CRIMPL-NODIR >&2; exit {_MISSING_STATUS}; }}; m=0; {checks}"
        f"if [ $m = 1 ]; then echo CRIMPL-LISTING >&2; ls -A1p >&2; exit {_MISSING_STATUS}; fi; "
        # Totals for the progress bar: entries that are not directories, and file bytes.
        f"find {' '.join(words)} -printf '%y %s\\n' 2>/dev/null | "
        "awk '{ if ($1 != \"d\") n++; if ($1 == \"f\") b += $2 } "
        "END { printf \"%d %.0f\\n\", n, b }'; "
        # What each path matched, NUL-separated, an empty field after each path.
        f"{expansions}"
        # The names to send come back on stdin, verbatim. Hard links become plain
        # files, so each entry unpacks on its own.
        f"exec tar -c -f - -H gnu --hard-dereference --exclude={MANIFEST} "
        f"--exclude='{UPLOAD_TMP_PREFIX}*' --null --no-unquote --verbatim-files-from -T -"
    )


def _download_error(status, stderr, where, patterns):
    if status != _MISSING_STATUS:
        return TransferError(f"download from {where} failed ({status_text(status, stderr)})")
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


def _move_into_place(members, landings, staging, dest, single, report):
    """Move the unpacked members from ``staging`` to ``dest``, checking every conflict first.

    :param landings: ``{member name: path relative to dest}`` of the members to move.
    :param single: write the one file as ``dest`` itself.
    """
    moving = {m.name: m for m in members if m.name in landings}
    if single:
        targets = {name: dest for name in moving}
    elif dest.exists() and not dest.is_dir():
        raise TransferError(f"cannot download into {dest}: it is a file and several "
                            "entries matched; give a directory")
    else:
        targets = {name: dest / landings[name] for name in moving}
    in_the_way, checked = set(), {dest}
    for member in moving.values():
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
    for name in sorted(moving):  # parents sort before their children
        member = moving[name]
        target = targets[name]
        inside_moved = ancestors(posixpath.dirname(name), moved)
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
