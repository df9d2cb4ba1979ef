"""Inputs shared across jobs: a content-addressed store on the server and a local hash index.

The store is one flat folder (``<remote_dir>/objects`` for the job API) of
read-only files named ``<sha256>_<mtime>_<mode>``: the content's hash, the
whole-second mtime and the octal mode the file was stored with. A job's input
is a hard link to its object, so a second job with the same inputs costs no
bytes and no disk. The name is also the record the integrity guard checks: an
object is reused only while its size, mtime (to the nanosecond: tar sets whole
seconds, any later write sets a fraction) and mode are still the ones it was
stored with. A job that rewrites an input in place (possible despite the
read-only mode: as root, or after a ``chmod``) changes the object it links, so
the next upload finds the mismatch, evicts the object and sends the file again.
The limit of hard links: such a write also reaches the jobs submitted *before*
it that link the same object (their inputs are that very file); only the
read-only mode stands in its way.
Objects enter the store only by a rename of a complete file, after the whole
tar stream arrived (see :mod:`.upload`).

The store holds at most ``cap`` bytes (:data:`DEFAULT_CAP`, 10 GiB): after each
upload, objects no job links any more (link count 1) are removed, least recently
linked first (a link updates the inode's ctime), until the store fits. An object
that a job directory links is never evicted, so the store may exceed the cap
while jobs keep their inputs; :func:`clean` removes old jobs and then the
objects they alone used.

Locally, :class:`HashIndex` remembers each file's sha256 per (path, size,
mtime_ns, inode) in ``$CRIMPL_HOME/hashes.json``, so that a file is hashed
once, while it is sent, and never read again for a later upload.
"""

import json
import os
import shlex
import time
from dataclasses import dataclass, field

from ..home import crimpl_home, write_private_file
from ..log import warn
from .streams import status_text

#: Default size cap of the store, in bytes (10 GiB).
DEFAULT_CAP = 10 * 2**30
#: File in ``$CRIMPL_HOME`` that holds the local hash index.
INDEX_FILE = "hashes.json"
#: Entries kept in the index; the least recently used go first.
INDEX_LIMIT = 100_000


def stored_mode(mode: int) -> int:
    """The mode of a file in the store and in a job directory: ``mode`` without write bits."""
    return mode & ~0o222


def object_name(digest: str, mtime: int, mode: int) -> str:
    """The name of the object holding content ``digest`` stored with ``mtime`` and ``mode``."""
    return f"{digest}_{mtime}_{mode:o}"


def intact(name: str, size: int, listed_mtime: str, listed_mode: str, expected_size: int) -> bool:
    """Is the object ``name`` still as it was stored, by what the server listed?

    :param size: its size now.
    :param listed_mtime: its mtime as ``find -printf %T@`` prints it (seconds.fraction).
    :param listed_mode: its mode as ``find -printf %m`` prints it (octal).
    :param expected_size: the size of the content its hash names.
    """
    try:
        _digest, mtime, mode = name.rsplit("_", 2)
    except ValueError:
        return False
    seconds, _, fraction = listed_mtime.partition(".")
    return (size == expected_size and seconds == mtime and not fraction.strip("0")
            and listed_mode == mode)


def query_script(store: str, nbytes: int) -> str:
    """Shell code that reads ``nbytes`` of wanted object names on stdin and lists those present.

    It prints ``name size mtime mode`` per present object, then a line ``.``. It
    reads exactly ``nbytes``: the rest of stdin belongs to the upload.
    """
    # head -c reads what the client sent and no further; awk keeps the wanted rows.
    return (
        f"S={shlex.quote(store)}; mkdir -p -- \"$S\"; S=$(cd -- \"$S\" && pwd -P); "
        f"{{ head -c {nbytes}; echo; "
        "find \"$S\" -maxdepth 1 -type f -printf '%f %s %T@ %m\\n'; } | "
        "awk 'w == 0 { if ($0 == \"\") w = 1; else want[$0] = 1; next } ($1 in want)'; "
        "echo .; "
    )


def finish_lines(tmp_objects: str, names, evict) -> list[str]:
    """Shell lines for the finish script that put the new objects into the store.

    The store's absolute path is the finish script's ``$1``.

    :param tmp_objects: the folder in the upload's temporary folder that holds the new objects.
    :param names: the new objects' names, complete files by now.
    :param evict: names of objects that failed the integrity guard.
    """
    q = shlex.quote
    lines = []
    names, evict = list(names), list(evict)
    for i in range(0, len(evict), 500):
        lines.append("(cd -- \"$1\" && rm -f -- " + " ".join(map(q, evict[i:i + 500])) + ")")
    for i in range(0, len(names), 500):
        batch = " ".join(q(f"{tmp_objects}/{n}") for n in names[i:i + 500])
        # rename(2): an object appears whole or not at all.
        lines.append(f'mv -f -t "$1" -- {batch}')
    return lines


def evict_script(store_expr: str, cap: int) -> str:
    """Shell pipeline that removes unlinked objects, least recently linked first, down to ``cap`` bytes."""
    return (
        f"find {store_expr} -maxdepth 1 -type f -printf '%n %C@ %s %f\\n' | LC_ALL=C sort -k2,2n | "
        f"awk -v cap={int(cap)} '{{ total += $3; if ($1 == 1) c[++n] = $0 }} "
        "END { for (i = 1; i <= n && total > cap; i++) "
        "{ split(c[i], f, \" \"); print f[4]; total -= f[3] } }' | "
        f"(cd -- {store_expr} && xargs -r rm -f --)"
    )


def parse_query(text: str) -> dict:
    """``{name: (size, mtime text, mode text)}`` from the rows :func:`query_script` prints."""
    present = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) == 4 and parts[1].isdigit():
            present[parts[0]] = (int(parts[1]), parts[2], parts[3])
    return present


# --------------------------------------------------------------------------- clean


@dataclass
class CleanReport:
    """What :func:`clean` removed, or would remove with ``dry_run``.

    :param jobs: the job directories.
    :param objects: the store objects no job would link any more.
    :param bytes: the bytes those objects hold.
    """

    jobs: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)
    bytes: int = 0


_CLEAN_SCRIPT = r"""
S={store}
mkdir -p -- "$S"
# Links to each object from the folders that go: an object whose every other link
# is among them (link count = 1 + those links) is unreferenced once they are gone.
objects=$({{ for d in {dirs}; do [ -d "$d" ] && find "$d" -type f -links +1 -printf 'L %i\n'; done
  find "$S" -maxdepth 1 -type f -printf 'O %i %n %s %f\n'; }} |
  awk '$1 == "L" {{ l[$2]++; next }} $1 == "O" && $3 - l[$2] <= 1 {{ print "object", $5, $4 }}')
for d in {dirs}; do [ -d "$d" ] && echo "job $d"; done
[ -z "$objects" ] || printf '%s\n' "$objects"
if [ {dry_run} = no ]; then
  for d in {dirs}; do rm -rf -- "$d"; done
  printf '%s\n' "$objects" | awk 'NF == 3 {{ print $2 }}' | (cd -- "$S" && xargs -r rm -f --)
fi
"""


def clean(conn, store: str, dirs, *, dry_run: bool) -> CleanReport:
    """Remove the folders ``dirs`` and every object of ``store`` that nothing else links.

    :param conn: a :class:`fabric.Connection` or an :class:`invoke.Context`.
    :param store: the store folder as the remote shell sees it.
    :param dirs: folders to remove (job directories), as the remote shell sees them.
    :param dry_run: list only, remove nothing.
    :returns: a :class:`CleanReport` of what went (or would go).
    :raises TransferError: if the command failed on the server.
    """
    from ..errors import TransferError
    from .streams import open_stream, opened

    script = _CLEAN_SCRIPT.format(store=shlex.quote(store),
                                  dirs=" ".join(shlex.quote(d) for d in dirs) or "''",
                                  dry_run="yes" if dry_run else "no")
    with opened(open_stream(conn, script)) as stream:
        stream.close_stdin()
        out = bytearray()
        while data := stream.recv(2**16):
            out += data
        status, stderr = stream.finish()
    if status != 0:
        raise TransferError(f"cleaning {store} failed ({status_text(status, stderr)}); try again")
    report = CleanReport()
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "job":
            report.jobs.append(rest)
        elif kind == "object":
            name, _, size = rest.partition(" ")
            report.objects.append(name)
            report.bytes += int(size)
    return report


# --------------------------------------------------------------------------- local index


class HashIndex:
    """The sha256 of local files, valid while a file's (path, size, mtime_ns, inode) is unchanged.

    Loaded once per upload; :meth:`save` merges into the file on disk and
    replaces it by a rename (mode 0600), so crimpl processes that save at the
    same time never corrupt it (one's new entries may be lost: it is a cache).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else os.fspath(crimpl_home() / INDEX_FILE)
        self.entries = self._read()
        self.changed = {}

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                files = json.load(handle)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # missing or unreadable: a cache, start afresh
        return files if isinstance(files, dict) else {}

    @staticmethod
    def _key(path) -> str:
        return os.path.abspath(path)

    def lookup(self, path, size: int, mtime_ns: int, ino: int) -> str | None:
        """The sha256 recorded for this file, or None if it changed or was never hashed."""
        key = self._key(path)
        entry = self.changed.get(key) or self.entries.get(key)
        if (isinstance(entry, list) and len(entry) == 5 and entry[:3] == [size, mtime_ns, ino]
                and isinstance(entry[3], str)):
            return entry[3]
        return None

    def record(self, path, size: int, mtime_ns: int, ino: int, digest: str) -> None:
        """Remember ``digest`` as the sha256 of the file in this state."""
        self.changed[self._key(path)] = [size, mtime_ns, ino, digest, int(time.time())]

    def save(self) -> None:
        """Merge the new entries into the index file (write, then rename); a failure only warns."""
        if not self.changed:
            return
        entries = self._read()
        entries.update(self.changed)
        if len(entries) > INDEX_LIMIT:
            newest = sorted(entries, key=lambda k: entries[k][4] if isinstance(entries[k], list)
                            and len(entries[k]) == 5 else 0)[-INDEX_LIMIT:]
            entries = {k: entries[k] for k in newest}
        try:
            write_private_file(self.path, json.dumps({"version": 1, "files": entries},
                                                     separators=(",", ":")))
        except OSError as exc:
            warn(f"could not save the hash index {self.path} ({exc.strerror}); "
                 "unchanged files will be hashed again next time")
            return
        self.entries, self.changed = entries, {}
