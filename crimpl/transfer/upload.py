"""Upload: scan local sources, plan against the remote manifest, send one tar stream.

Protocol (one exec channel, one round trip before the data):

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

With a ``store`` (see :mod:`.store`), the client first sends the names of the
objects its files would be (for the files whose hash the local index knows),
and the server answers which of them it has, in the same round trip as the
listing. A file whose object is there and intact goes into the tar stream as a
hard link to ``.crimpl-store/<object>`` (a symlink to the store in the temporary
folder); any other file is sent, hashed as it goes, followed by a hard link
``.crimpl-objects/<object>`` to it. The finish script renames those into the
store, whole files only, before it moves the job's entries into place, and at
the end evicts unlinked objects over the store's size cap.

A caller may fold its own steps into the same command (a submit does: see
:meth:`crimpl.jobs.JobsMixin.submit_script`): a ``guard`` runs first and answers
one line before the store's answer (anything but ``ok`` ends the command with
nothing sent), and a ``then`` runs once the finish script succeeded, after a
line ``crimpl-uploaded``. The client then always sends ``go`` (with the tar
stream) or ``skip`` (nothing to send): a command that sees EOF instead, as when
the connection is cut, stops before ``then``.
"""

import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import shlex
import stat
import tarfile
import time
from dataclasses import dataclass, field

import pathspec

from ..errors import TransferError
from ..ssh import counted
from . import store as objects
from .streams import (
    CHUNK,
    CONNECTION_ERRORS,
    Progress,
    StreamWriter,
    TransferReport,
    describe_exception,
    location,
    open_stream,
    opened,
    path_list,
    status_text,
)

MANIFEST = ".crimpl-manifest"
IGNORE_FILE = ".crimplignore"
#: Names starting with this are crimpl's own bookkeeping in ``remote_dir``.
RESERVED_PREFIX = ".crimpl-"
UPLOAD_TMP_PREFIX = ".crimpl-upload-"
_FINISH_SCRIPT = ".crimpl-finish"
# In the temporary folder of a store upload: the store (a symlink) and the new objects.
_STORE_LINK = ".crimpl-store"
_NEW_OBJECTS = ".crimpl-objects"
# The line an upload with ``then`` prints once it completed, before the output of ``then``.
_UPLOADED = b"crimpl-uploaded"
# Files per ``mv`` command in the remote finish script, well below ARG_MAX.
_MV_BATCH = 500


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
    ino: int = 0


def upload(conn, sources, remote_dir, *, quiet=False, callback=None, store=None,
           store_cap=objects.DEFAULT_CAP, guard=None, then=None):
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
    :param store: a folder on the same file system as ``remote_dir`` that holds
        the content-addressed store (see :mod:`.store`): files it has are linked
        from it instead of sent, files sent are added to it. None: no store, every
        file's mode is kept; with a store, files arrive without write permission.
    :param store_cap: the store's size cap in bytes.
    :param guard: shell code the server runs first, in the same command, before anything
        is sent; it prints one line: ``ok`` to go on, anything else ends the upload with
        nothing sent and that line in ``report.refused``.
    :param then: shell code the server runs with ``sh`` from the login folder once the
        upload completed, in the same command (no round trip of its own); never after
        an upload that failed or was cut. Its output and exit status are
        ``report.then_output`` and ``report.then_status``.
    :returns: a :class:`TransferReport`; ``connections`` and ``channels`` count what it opened.
    :raises TransferError: if a source is missing (before anything is sent), or the
        copy failed; a failed upload can simply be retried.
    """
    names, entries = _scan_sources(sources)
    with counted() as trips:
        report = _upload(conn, names, entries, remote_dir, quiet, callback, store, store_cap, guard, then)
    report.connections, report.channels = trips.connections, trips.channels
    return report


def _upload(conn, names, entries, remote_dir, quiet, callback, store, store_cap, guard, then):
    """:func:`upload` once the sources are scanned."""
    token = secrets.token_hex(6)
    index = objects.HashIndex() if store is not None else None
    query = "".join(f"{name}\n" for name in _wanted(entries, index)).encode("ascii")
    script = _upload_script(remote_dir, names, UPLOAD_TMP_PREFIX + token, store, len(query), guard, then)
    report = TransferReport()
    where = location(conn, remote_dir)
    rest = b""
    try:
        with opened(open_stream(conn, script)) as stream:
            present, pending = {}, b""
            if index is not None:
                stream.send(query)  # before any answer: the query costs no round trip of its own
            if guard is not None:
                answer, pending = _read_line(stream, pending, "whether the upload may go on")
                if answer != "ok":
                    report.refused = answer
                    return report
            if index is not None:
                present, pending = _read_store_answer(stream, pending)
            manifest, remote = _read_listing(stream, where, pending)
            plan = _plan_upload(entries, manifest, remote, names, index)
            if index is not None:
                _plan_links(plan, index, present)
            report.files_skipped = plan.skipped
            if not plan.send and not plan.chmod:
                if then is None:
                    # The remote side sees EOF instead of "go" and exits 0; no need to
                    # wait a round trip for its status.
                    return report
                stream.send(b"skip\n")
            else:
                stream.send(b"go\n")
                progress = Progress(f"upload {remote_dir}", plan.bytes, len(plan.send),
                                    quiet=quiet, callback=callback)
                try:
                    _send_tar(stream, plan, progress, UPLOAD_TMP_PREFIX + token, index, store_cap)
                finally:
                    progress.close()
            stream.close_stdin()
            if then is not None:
                rest = stream.read_rest()
            status, stderr = stream.finish()
    except (*CONNECTION_ERRORS, tarfile.TarError) as exc:
        raise TransferError(
            f"upload to {where} failed ({describe_exception(exc)}); retry to complete it"
        ) from exc
    finally:
        if index is not None:
            index.save()  # hashes made while sending stay true whatever became of the upload
    marker, _, output = rest.partition(b"\n")
    if then is not None and marker == _UPLOADED:
        report.then_output = output.decode("utf-8", "replace")
        report.then_status = status
    elif status != 0 or then is not None:
        raise TransferError(
            f"upload to {where} failed ({status_text(status, stderr)}); retry to complete it"
        )
    for rel, entry in plan.send:
        if rel in plan.linked:
            report.files_linked += 1
            report.bytes_linked += entry.size
        elif entry.kind != "d":
            report.files_sent += 1
            report.bytes_sent += entry.size if entry.kind == "f" else 0
            report.files.append(rel)
    return report


def _wanted(entries, index):
    """The objects that the files with a known hash would be, to ask the store about."""
    if index is None:
        return []
    wanted = set()
    for entry in entries.values():
        if entry.kind == "f":
            digest = index.lookup(entry.path, entry.size, entry.mtime_ns, entry.ino)
            if digest is not None:
                wanted.add(objects.object_name(digest, entry.mtime, objects.stored_mode(entry.mode)))
    return sorted(wanted)


def _read_line(stream, pending, what):
    """Read one line the server prints; return ``(line, bytes after it)``.

    :param what: what the line answers, for the error if the command ends first.
    """
    buf = bytearray(pending)
    while b"\n" not in buf:
        data = stream.recv(CHUNK)
        if not data:
            status, stderr = stream.finish()
            raise TransferError(f"the server did not answer {what} ({status_text(status, stderr)})")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    return line.decode("utf-8", "replace"), rest


def _read_store_answer(stream, pending=b""):
    """Read the store's answer (rows, then a line ``.``); return ``(present, bytes after it)``."""
    buf = bytearray(pending)
    while True:
        # The rows end with a line holding only "."; object names never look like that.
        end = 0 if buf.startswith(b".\n") else buf.find(b"\n.\n") + 1
        if end or buf.startswith(b".\n"):
            rows = bytes(buf[:end]).decode("ascii", "replace")
            return objects.parse_query(rows), bytes(buf[end + 2:])
        data = stream.recv(CHUNK)
        if not data:
            status, stderr = stream.finish()
            raise TransferError(f"the server did not answer which inputs it has "
                                f"({status_text(status, stderr)})")
        buf += data


def _scan_sources(sources):
    """Return ``(top-level names, {relative path: _Entry})`` for the sources.

    Checks every source before anything else, so a missing one is reported
    before a connection is even opened.
    """
    sources = path_list(sources, "sources to upload")
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
        link=os.readlink(path) if kind == "l" else "", ino=st.st_ino,
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


def _upload_script(remote_dir, names, tmp, store=None, query_bytes=0, guard=None, then=None):
    d = shlex.quote(remote_dir)
    starts = " ".join(shlex.quote("./" + n) for n in names)
    query = objects.query_script(store, query_bytes) if store is not None else ""
    # The store as a symlink in the temporary folder: the stream's hard links point through it.
    link = f'ln -s "$S" {tmp}/{_STORE_LINK}; ' if store is not None else ""
    finish = f"sh {tmp}/{_FINISH_SCRIPT}" + (' "$S"' if store is not None else "")
    receive = (
        # Temporary folders of interrupted uploads; failure to remove one is harmless.
        f"rm -rf ./{UPLOAD_TMP_PREFIX}* 2>/dev/null || :; mkdir {tmp}; {link}"
        f"tar -x -p --no-same-owner -f - -C {tmp}; "
    )
    if then is None:
        # EOF instead of "go": nothing to send.
        tail = f'IFS= read -r go || exit 0; [ "$go" = go ] || exit 0; {receive}exec {finish}'
    else:
        # "skip": nothing to send, go on to `then`; EOF (a cut connection): stop here.
        # The marker line tells the client that what follows is the output of `then`.
        tail = (f'IFS= read -r go || exit 0; case $go in go) {receive}{finish};; skip) ;; *) exit 0;; esac; '
                f'echo {_UPLOADED.decode()}; cd -- "$crimpl_top"; exec sh -c {shlex.quote(then)}')
    # The guard's one line comes first; set -e stops at nothing inside it.
    check = (f'crimpl_g=$(set +e; {guard}); printf \'%s\\n\' "$crimpl_g"; [ "$crimpl_g" = ok ] || exit 0; '
             if guard is not None else "")
    return (
        f'set -e; crimpl_top=$(pwd); {check}{query}mkdir -p -- {d}; cd -- {d}; '
        # Listing: manifest, NUL, then six NUL-terminated fields per path, then END.
        # A NUL inside the manifest would end it early: such a manifest is invalid
        # anyway, and without its NULs it reads as invalid JSON, i.e. no manifest.
        f"{{ tr -d '\\000' < {MANIFEST} 2>/dev/null || :; printf '\\0'; "
        f"find {starts} -printf '%y\\0%s\\0%T@\\0%m\\0%l\\0%p\\0' 2>/dev/null || :; "
        "printf 'END\\0'; }; "
        f"{tail}"
    )


def _read_listing(stream, where, pending=b""):
    """Read the manifest and the ``find`` listing the upload command prints first.

    :param where: ``host:remote_dir``, for messages.
    :param pending: bytes of it already received.
    :returns: ``(manifest, remote)``: ``{rel: manifest entry}`` and
        ``{rel: (kind, size, mtime, mode, link)}``.
    :raises TransferError: if the listing is malformed.
    """
    buf = bytearray(pending)
    while True:
        if buf.endswith(b"\0END\0"):
            parsed = _parse_listing(bytes(buf), where)
            if parsed is not None:
                return parsed
        data = stream.recv(CHUNK)
        if not data:
            status, stderr = stream.finish()
            raise TransferError(f"the server did not list remote_dir ({status_text(status, stderr)})")
        buf += data


def _parse_listing(data, where):
    """Parse the listing; None if it is not complete yet ("END" was a symlink's target)."""
    head, _, rest = data.partition(b"\0")
    fields = rest.split(b"\0")[:-1]
    remote = {}
    for i in range(0, len(fields), 6):
        group = [f.decode("utf-8", "surrogateescape") for f in fields[i:i + 6]]
        if group == ["END"]:
            return _manifest_files(head), remote
        _check_listed(group[:4] + group[5:], where)
        if len(group) < 6:
            # The data stopped inside an entry: "END" was its symlink's target.
            return None
        kind, size, mtime, mode, link, path = group
        # %T@ is "seconds.fraction": parse as text, a float would round up.
        remote[path[2:]] = (kind, int(size), int(mtime.partition(".")[0]), int(mode, 8), link)
    return None


_LISTED_NUMBERS = re.compile(r"[0-9]+ -?[0-9]+(\.[0-9]*)? [0-7]+")


def _check_listed(fields, where):
    """Check an entry's fields of the listing, but its link: kind, size, mtime, mode and path."""
    kind, size, mtime, mode, path = (fields + [""] * 5)[:5]
    well_formed = (len(kind) == 1 and _LISTED_NUMBERS.fullmatch(f"{size} {mtime} {mode}")
                   and (len(fields) < 5 or path.startswith("./")))
    if not well_formed:
        shown = " ".join(fields)[:80]
        raise TransferError(f"upload to {where} failed: the server's listing is malformed "
                            f"({shown!r}); is GNU find installed there?")


def _manifest_files(data):
    """The ``files`` of a manifest, keeping only well-formed entries.

    An unreadable manifest, or entry, counts as absent: those files are verified
    or sent again, and the next manifest is clean.
    """
    try:
        files = json.loads(data.decode("utf-8", "surrogateescape"))["files"] if data else {}
    except (ValueError, KeyError, TypeError, IndexError, RecursionError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {rel: entry for rel, entry in files.items() if _valid_entry(entry)}


def _valid_entry(entry):
    """Is ``entry`` a manifest entry ``[kind, size, mtime, mode, sha256 or link, mtime_ns]``?"""
    if not isinstance(entry, list) or len(entry) != 6:
        return False
    kind, size, mtime, mode, text, mtime_ns = entry
    numbers = (size, mtime, mode, mtime_ns)
    return (kind in ("f", "d", "l") and isinstance(text, str)
            and all(type(n) is int for n in numbers))


@dataclass
class _Plan:
    send: list = field(default_factory=list)  # [(rel, _Entry)] in parent-first order
    skipped: int = 0
    bytes: int = 0
    chmod: list = field(default_factory=list)  # [(rel, mode)] existing remote directories
    remove: list = field(default_factory=list)  # remote paths of another type, removed first
    manifest: dict = field(default_factory=dict)  # entries kept from the old manifest
    remote: dict = field(default_factory=dict)
    # With a store: {rel: (object, sha256)} of files linked from it, objects to evict.
    linked: dict = field(default_factory=dict)
    evict: list = field(default_factory=list)


def _plan_upload(entries, manifest, remote, names, index=None):
    """Decide what to send; see the module docstring for the rules.

    :param index: the local :class:`~.store.HashIndex` of a store upload, else None.
    """
    plan = _Plan(remote=remote)
    mode_of = objects.stored_mode if index is not None else (lambda mode: mode)
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
        if have is not None and _unchanged(entry, plan.manifest.get(rel), have, mode_of, index):
            plan.skipped += 1
            continue
        plan.send.append((rel, entry))
        plan.bytes += entry.size
    return plan


def _plan_links(plan, index, present):
    """Take from the store each file to send whose object is there and intact."""
    for rel, entry in plan.send:
        if entry.kind != "f":
            continue
        digest = index.lookup(entry.path, entry.size, entry.mtime_ns, entry.ino)
        if digest is None:
            continue
        name = objects.object_name(digest, entry.mtime, objects.stored_mode(entry.mode))
        if name not in present:
            continue
        if objects.intact(name, *present[name], entry.size):
            plan.linked[rel] = (name, digest)
            plan.bytes -= entry.size
        elif name not in plan.evict:
            # Rewritten in place by a job since it was stored: never reused.
            plan.evict.append(name)


def _matches(old, have):
    """Is the server's file still the one the manifest entry describes?"""
    if have is None or not isinstance(old, list) or len(old) != 6 or have[0] != old[0]:
        return False
    kind, size, mtime, mode, _digest, _ns = old
    if kind == "f":
        return (have[1], have[2], have[3]) == (size, mtime, mode)
    return True


def _unchanged(entry, old, have, mode_of, index):
    """Can ``entry`` be skipped: is the server's copy verified equal to the local one?

    :param mode_of: the mode a local mode has on the server.
    :param index: the local hash index, or None.
    """
    if entry.kind == "l":
        return have[4] == entry.link
    if old is None or old[0] != "f":
        return False  # not uploaded by crimpl (or no longer as uploaded): send it
    _kind, size, _mtime, mode, digest, mtime_ns = old
    if size != entry.size or mode != mode_of(entry.mode):
        return False
    if mtime_ns == entry.mtime_ns:
        return True
    # Same size, different mtime (touched, regenerated, checked out again): the
    # content hash decides, so an unchanged file is not sent again.
    known = index.lookup(entry.path, entry.size, entry.mtime_ns, entry.ino) if index else None
    if known is None:
        known = _sha256(entry.path)
        if index is not None:
            index.record(entry.path, entry.size, entry.mtime_ns, entry.ino, known)
    if known != digest:
        return False
    old[5] = entry.mtime_ns  # remembered if a new manifest is written this time
    return True


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while data := handle.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


def _send_tar(stream, plan, progress, tmp, index=None, store_cap=objects.DEFAULT_CAP):
    """Write the changed entries, the finish script and the new manifest as one tar stream.

    :param index: the local hash index of a store upload (None: no store); the
        hashes of the files sent are recorded in it.
    """
    manifest = dict(plan.manifest)
    tar = _TarWriter(StreamWriter(stream, progress))
    new_objects = {}  # object name -> the path of its first file in this stream
    for rel, entry in plan.send:
        info = tarfile.TarInfo(rel)
        info.mtime = entry.mtime  # whole seconds: no pax header per file
        info.mode = entry.mode if index is None or entry.kind != "f" else objects.stored_mode(entry.mode)
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
        if index is not None and _add_link(tar, info, rel, entry, plan, index, new_objects):
            manifest[rel] = ["f", entry.size, entry.mtime, info.mode, plan.linked[rel][1], entry.mtime_ns]
            progress.advance(nfiles=1)
            continue
        info.size = entry.size
        with _open_source(entry) as handle:
            digest = tar.add(info, handle)
            after = os.fstat(handle.fileno())
        # tar sends the size announced in the header: a file that grew or was
        # rewritten meanwhile would arrive cut or mixed. Failing here leaves the
        # server as it was (the finish script and manifest never arrive).
        if (after.st_size, after.st_mtime_ns) != (entry.size, entry.mtime_ns):
            raise TransferError(f"{entry.path} changed while it was being sent; upload again")
        manifest[rel] = ["f", entry.size, entry.mtime, info.mode, digest, entry.mtime_ns]
        if index is not None:
            index.record(entry.path, entry.size, entry.mtime_ns, entry.ino, digest)
            name = objects.object_name(digest, entry.mtime, info.mode)
            if name not in new_objects:
                new_objects[name] = rel
                tar.add(_hard_link(f"{_NEW_OBJECTS}/{name}", rel, info))
        progress.advance(nfiles=1)
    script = _finish_script(plan, tmp)
    if index is not None:
        store_lines = objects.finish_lines(f"{tmp}/{_NEW_OBJECTS}", new_objects, plan.evict)
        # Objects into the store before the job's entries move; eviction once they have.
        script = script.replace("set -e\n", "set -e\n" + "".join(f"{line}\n" for line in store_lines), 1)
        script += objects.evict_script('"$1"', store_cap) + " || :\n"
    tar.add_bytes(_FINISH_SCRIPT, script.encode("utf-8", "surrogateescape"))
    # The manifest travels last and is moved into place last (see the finish script).
    body = json.dumps({"version": 1, "files": manifest}, separators=(",", ":"))
    tar.add_bytes(MANIFEST, body.encode("ascii"))
    tar.close()


def _add_link(tar, info, rel, entry, plan, index, new_objects):
    """Write ``rel`` as a hard link to its object if the store or this stream has it.

    :returns: True if it was written (and is recorded in ``plan.linked``).
    """
    if rel in plan.linked:
        tar.add(_hard_link(rel, f"{_STORE_LINK}/{plan.linked[rel][0]}", info))
        return True
    digest = index.lookup(entry.path, entry.size, entry.mtime_ns, entry.ino)
    if digest is None:
        return False
    name = objects.object_name(digest, entry.mtime, info.mode)
    if name not in new_objects:
        return False
    # Same content earlier in this stream: link to that file.
    tar.add(_hard_link(rel, new_objects[name], info))
    plan.linked[rel] = (name, digest)
    return True


def _hard_link(name, target, like):
    """A tar hard link ``name`` -> ``target`` (relative to the extraction folder)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mtime, info.mode = like.mtime, like.mode
    return info


def _open_source(entry):
    try:
        return open(entry.path, "rb")
    except FileNotFoundError as exc:
        raise TransferError(f"{entry.path} disappeared while it was being uploaded; "
                            "upload again") from exc
    except OSError as exc:
        raise TransferError(f"cannot read {entry.path} ({exc.strerror}); "
                            "nothing was changed on the server") from exc


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
                raise TransferError(f"{getattr(handle, 'name', 'a file')} changed while it was being "
                                    "sent; upload again")
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
        if ancestors(parent, moved_dirs):
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


def ancestors(path, candidates):
    """Is ``path`` or one of its ancestors in ``candidates``?"""
    while path:
        if path in candidates:
            return True
        path = posixpath.dirname(path)
    return False
