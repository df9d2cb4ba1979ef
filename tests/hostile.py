"""A real sshd whose tools lie, and hand-made tar streams, for the transfer tests.

:class:`LyingSshd` is OpenSSH's sshd on loopback whose authorized key carries a
forced command (``command="..."`` in ``authorized_keys``, standard OpenSSH):
the client's command still runs with ``sh``, but with a folder of stand-ins
first in ``PATH``. Each stand-in (``tar``, ``find``, ``awk``) prints a canned
answer when the test left one, and runs the real tool otherwise. So crimpl's
own protocol runs end to end through sshd, and only what the test chose is a lie.
"""

import io
import os
import shlex
import shutil
import stat
import tarfile
from pathlib import Path

from sandbox import Sshd

#: The tools a test can make lie.
TOOLS = ("tar", "find", "awk")


class LyingSshd(Sshd):
    """An sshd on loopback whose ``tar``, ``find`` and ``awk`` print what the test says.

    :param workdir: its folder (config, keys, stand-ins, canned answers).
    :param host_private_pem: its host key.
    :param authorized_public: the client's public key line.
    """

    def __init__(self, workdir, host_private_pem, authorized_public):
        workdir = Path(workdir)
        self.bin = workdir / "lying-bin"
        self.answers = workdir / "answers"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.answers.mkdir(exist_ok=True)
        for tool in TOOLS:
            real = shutil.which(tool)
            answer = shlex.quote(str(self.answers / tool))
            script = self.bin / tool
            script.write_text(
                "#!/bin/sh\n"
                f"if [ -e {answer} ]; then exec cat {answer}; fi\n"
                f'exec {shlex.quote(real)} "$@"\n', encoding="utf-8")
            script.chmod(0o755)
        forced = workdir / "forced-command"
        forced.write_text(
            "#!/bin/sh\n"
            f"PATH={shlex.quote(str(self.bin))}:$PATH; export PATH\n"
            'exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n', encoding="utf-8")
        forced.chmod(0o755)
        super().__init__(workdir, host_private_pem,
                         f'command="{forced}" {authorized_public.strip()}')

    def lie(self, tool, output):
        """Make ``tool`` print ``output`` (bytes) instead of running, until :meth:`tell_the_truth`."""
        (self.answers / tool).write_bytes(output)

    def tell_the_truth(self):
        for tool in TOOLS:
            (self.answers / tool).unlink(missing_ok=True)


# --------------------------------------------------------------------------- tar streams


def entry(name, kind=tarfile.REGTYPE, link="", data=b"", mode=0o644):
    """One tar entry as ``(TarInfo, data)``; ``kind`` is a tarfile type such as SYMTYPE."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.size = len(data)
    return info, data


def tar_bytes(*entries):
    """A GNU tar archive of ``(TarInfo, data)`` entries, in that order (duplicates kept)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def climbing_links(folder, depth=24):
    """Links in ``folder`` that each look like ``.`` as text but really climb one level.

    ``l -> .``, ``u1 -> l/..``, ``u2 -> u1/..``, ...: ``u{depth}`` is the file
    system's root for any destination less than ``depth`` levels deep (and the
    chain stays below Linux's limit of 40 links in one path).

    :returns: ``(entries, name of the last link)``.
    """
    links = [entry(f"{folder}/l", tarfile.SYMTYPE, ".")]
    previous = "l"
    for i in range(1, depth + 1):
        links.append(entry(f"{folder}/u{i}", tarfile.SYMTYPE, f"{previous}/.."))
        previous = f"u{i}"
    return links, previous


def tree_state(root):
    """``{relative path: (type, mode, size, mtime_ns, inode, content or link)}`` of ``root`` and
    everything below it, without following links: any change at all shows.
    """
    root = Path(root)
    state = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            body = path.read_bytes()
        else:
            body = None
        state[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                              st.st_size, st.st_mtime_ns, st.st_ino, body)
    return state
