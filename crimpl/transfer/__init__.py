"""Copy files to and from the server: one tar stream per direction, incremental, resumable.

Both :func:`upload` and :func:`download` take ``conn``: a :class:`fabric.Connection`
to the server, or an :class:`invoke.Context` for the local target, where the same
shell commands run through ``/bin/sh`` on this machine. Everything goes through
ONE command per operation on that one connection (see :mod:`.streams`); the far
side needs only POSIX ``sh``, GNU ``tar``, ``find``, ``mv``, ``awk`` and ``ls``.

- :mod:`.streams`: the byte stream to the remote command, progress, messages;
- :mod:`.upload`: scan, plan against the remote manifest, tar writer, finish script;
- :mod:`.store`: the server's store of inputs shared by jobs, the local hash index, clean;
- :mod:`.download`: the download command, moving the files into place;
- :mod:`.safe_extract`: unpacking an untrusted tar stream (security-critical).
"""

from .download import download
from .safe_extract import safe_extract
from .streams import TransferReport
from .upload import IGNORE_FILE, MANIFEST, RESERVED_PREFIX, upload

__all__ = ["IGNORE_FILE", "MANIFEST", "RESERVED_PREFIX", "TransferReport", "download",
           "safe_extract", "upload"]
