"""Where crimpl keeps its local files, and how it writes private ones.

``$CRIMPL_HOME`` (default ``~/.crimpl``) holds saved configs, the pinned host
keys and the local target's jobs. These files are a cache of what AWS already
knows (instance tags are the source of truth), so losing them loses nothing.
"""

import os
import tempfile
from pathlib import Path

from .errors import ConfigError


def crimpl_home() -> Path:
    """Return ``$CRIMPL_HOME`` (default ``~/.crimpl``), created with mode 0700.

    :raises ConfigError: if it is not a folder crimpl can create or use.
    """
    home = Path(os.environ.get("CRIMPL_HOME") or "~/.crimpl").expanduser()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        what = "a file, not a folder" if home.exists() else f"not a folder crimpl can create ({exc.strerror})"
        raise ConfigError(
            f"crimpl's home {home} is {what}: point CRIMPL_HOME at a folder (default ~/.crimpl)"
        ) from exc
    return home


def write_private_file(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600.

    The content goes to a temporary file in the same folder that is renamed over
    ``path``, so a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
