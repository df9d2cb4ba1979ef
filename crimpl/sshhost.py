"""Any SSH host as a crimpl server (:class:`RemoteThreadServer`), and remote servers saved by name.

The host is what the user already logs in to: an OpenSSH alias or
``user@host[:port]``. Its OpenSSH config is honoured through fabric (HostName,
User, Port, IdentityFile, ProxyJump), and its host key is checked against the
user's own known_hosts (the config's ``UserKnownHostsFile``, else
``~/.ssh/known_hosts``), as OpenSSH's ``StrictHostKeyChecking yes`` does: an
unknown or changed key is refused before anything is sent.
``host_key_policy="accept-new"`` adds an unknown key to that file, as OpenSSH's
``accept-new`` does; a changed key is refused whatever the policy.

Jobs use the same protocol as on EC2 (:mod:`crimpl.jobs`), in
``<directory>/jobs/<job_name>/`` on the host. crimpl does not manage the host's
life: start, stop and terminate are errors.

A remote server can be saved by name (:meth:`RemoteThreadServer.save`) in
``$CRIMPL_HOME/servers/<name>.json`` (mode 0600; host, directory and settings,
no secrets) and loaded again with :func:`load_server`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import paramiko
from fabric import Config, Connection

from . import hostkeys, ssh
from .config import is_valid_name
from .errors import ConfigError, HostKeyMismatchError, JobError
from .home import crimpl_home, write_private_file
from .jobs import JobsMixin
from .jobs.api import shares_connection

#: The host key policies: refuse unknown keys (OpenSSH's ``yes``), or add them (``accept-new``).
HOST_KEY_POLICIES = ("strict", "accept-new")
#: Seconds a session tries to reach the host before the job's state reads ``unknown``.
SSH_TIMEOUT = 20
#: The user's known_hosts when the OpenSSH config names none.
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"


def _known_hosts_files(conn: Connection) -> list[Path]:
    """The known_hosts files OpenSSH would read for ``conn`` (its ``UserKnownHostsFile``)."""
    value = conn.ssh_config.get("userknownhostsfile") or DEFAULT_KNOWN_HOSTS
    words = value if isinstance(value, list) else value.split()
    return [Path(os.path.expanduser(word)) for word in words if word.lower() != "none"]


def _key_name(conn: Connection) -> str:
    """The name a host's key is filed under in known_hosts: ``host``, or ``[host]:port``."""
    return conn.host if int(conn.port) == 22 else f"[{conn.host}]:{conn.port}"


class KnownHostsFilePolicy(paramiko.MissingHostKeyPolicy):
    """What to do with a host whose key is not in the user's known_hosts.

    :param label: how the user named the host (the alias), for messages.
    :param known_hosts: the file a key is added to, and named in messages.
    :param accept_new: add the key there (OpenSSH's ``accept-new``); else refuse.
    """

    def __init__(self, label: str, known_hosts: Path, accept_new: bool):
        self.label = label
        self.known_hosts = known_hosts
        self.accept_new = accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.accept_new:
            host, _, port = hostname.strip("[").partition("]:")
            scan = f"ssh-keyscan {'-p ' + port + ' ' if port else ''}{host} >> {self.known_hosts}"
            raise HostKeyMismatchError(
                f"{self.label} ({hostname}) offers host key {ssh.fingerprint(key)}, which is not in "
                f"{self.known_hosts}: check it, then add it (`ssh {self.label}` once, or `{scan}`), "
                "or pass host_key_policy='accept-new'"
            )
        line = f"{hostname} {hostkeys.public_line(key)}\n"
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Appended, as OpenSSH does: the user's other lines stay as they are.
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(line)
        client.get_host_keys().add(hostname, key.get_name(), key)


def _verify_host_keys(conn: Connection, label: str, accept_new: bool) -> None:
    """Give ``conn`` (and each ProxyJump hop) a client that checks the user's known_hosts."""
    files = _known_hosts_files(conn)
    conn.client = paramiko.SSHClient()
    known = conn.client.get_host_keys()
    for path in files:
        for name, key in hostkeys.user_known_hosts(str(path)):
            known.add(name, key.get_name(), key)
    # OpenSSH asks for the key types it knows for the host; so does crimpl, so that a known
    # host is not taken for an unknown one because it offered another type first.
    types = set((known.lookup(_key_name(conn)) or {}).keys())
    if "ssh-rsa" in types:
        types |= {"rsa-sha2-256", "rsa-sha2-512"}
    if types:
        others = [k for k in paramiko.Transport._preferred_keys if k not in types]
        conn.connect_kwargs["disabled_algorithms"] = {"keys": others}
    target = files[0] if files else Path(os.path.expanduser(DEFAULT_KNOWN_HOSTS))
    conn.client.set_missing_host_key_policy(KnownHostsFilePolicy(label, target, accept_new))
    if isinstance(conn.gateway, Connection):
        _verify_host_keys(conn.gateway, conn.gateway.original_host, accept_new)


class RemoteThreadServer(JobsMixin):
    """An SSH host as a crimpl server: no scheduler, jobs run detached as on EC2.

    :param host: an OpenSSH alias (``hpc``) or ``user@host[:port]``.
    :param directory: crimpl's folder on the host (created if missing); ``~/`` is the login home.
    :param ssh_config: the OpenSSH config file to honour; default ``$CRIMPL_SSH_CONFIG``,
        else ``~/.ssh/config``.
    :param host_key_policy: ``strict`` (default) refuses a host whose key is not in the
        user's known_hosts; ``accept-new`` adds it there. A changed key is always refused.
    """

    #: What :func:`load_server` calls this kind in a saved server's file.
    kind = "ssh"
    #: An SSH host is no EC2 instance.
    instanceId = None  # noqa: N815 - the name the other server kinds use
    #: An SSH host is never shut down by crimpl.
    shutdown_command = "false"

    def __init__(self, host: str, directory: str = "~/crimpl", *, ssh_config: str | None = None,
                 host_key_policy: str = "strict") -> None:
        if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
            raise ConfigError(f"host must be an OpenSSH alias or user@host[:port], got {host!r}"[:200])
        if host_key_policy not in HOST_KEY_POLICIES:
            raise ConfigError(f"host_key_policy must be 'strict' or 'accept-new', got {host_key_policy!r}")
        if not isinstance(directory, str) or not directory.strip() or directory.startswith("~") and not (
                directory == "~" or directory.startswith("~/")):
            raise ConfigError(f"directory must be a path on the host (~/ for its home), got {directory!r}")
        self.host = host
        self.directory = directory
        self.ssh_config = ssh_config
        self.host_key_policy = host_key_policy

    def __repr__(self):
        return f"<{type(self).__name__} {self.host}:{self.directory}>"

    def __str__(self):
        return f"host {self.host}"

    @property
    def job_root(self) -> str:
        """crimpl's folder on the host; relative paths are under the login home."""
        # Every command quotes its paths, so "~" would not expand: sessions start in the home.
        if self.directory == "~":
            return "."
        return self.directory[2:] if self.directory.startswith("~/") else self.directory

    # -- SSH ---------------------------------------------------------------------

    def connection(self) -> Connection:
        """Return an unopened fabric Connection to the host, its key checked against known_hosts."""
        path = ssh.ssh_config_file(self.ssh_config)
        config = Config(runtime_ssh_path=path) if path else Config()
        conn = Connection(self.host, config=config, connect_timeout=ssh.CONNECT_TIMEOUT,
                          connect_kwargs={"transport_factory": ssh.CountingTransport})
        _verify_host_keys(conn, self.host, self.host_key_policy == "accept-new")
        return conn

    @shares_connection
    @contextlib.contextmanager
    def session(self, start: bool = True):
        """Yield one open SSH connection to the host.

        :param start: unused (an SSH host is always on); kept for the server kinds' one signature.
        """
        try:
            conn = ssh.open_when_ready(self.connection, timeout=SSH_TIMEOUT, label=self.host)
        except HostKeyMismatchError as exc:
            if isinstance(exc.__cause__, paramiko.BadHostKeyException):
                bad = exc.__cause__
                raise HostKeyMismatchError(
                    f"{self.host} ({bad.hostname}) offers host key {ssh.fingerprint(bad.key)}, but known_hosts "
                    f"holds {ssh.fingerprint(bad.expected_key)}: refusing to connect; if the host was "
                    f"rebuilt, check the new key, then `ssh-keygen -R '{bad.hostname}'` and connect once "
                    f"with `ssh {self.host}`"
                ) from bad
            raise
        # No folder is made here: the upload of a submit makes the job's folder (and so crimpl's).
        try:
            yield conn
        finally:
            conn.close()

    def ssh_command(self) -> list:
        """Return the OpenSSH argv for an interactive shell on the host."""
        path = ssh.ssh_config_file(self.ssh_config)
        return ["ssh", *(["-F", path] if path else []), "-o", "StrictHostKeyChecking="
                + ("accept-new" if self.host_key_policy == "accept-new" else "yes"), self.host]

    def _prepare_on_complete(self, on_complete):
        raise JobError(f"on_complete needs an EC2 server: crimpl never shuts {self.host} down")

    # -- lifecycle: not crimpl's -------------------------------------------------

    def _not_managed(self, action):
        return ConfigError(f"{self.host} is an SSH host crimpl does not manage: crimpl cannot {action} it; "
                           "use its own tools")

    def start(self, wait: bool = True):
        """Refused: crimpl does not manage an SSH host's life."""
        raise self._not_managed("start")

    def stop(self, wait: bool = True):
        """Refused: crimpl does not manage an SSH host's life."""
        raise self._not_managed("stop")

    def terminate(self, wait: bool = True):
        """Refused: crimpl does not manage an SSH host's life."""
        raise self._not_managed("terminate")

    # -- saved by name -----------------------------------------------------------

    def to_dict(self) -> dict:
        """What :meth:`save` writes: the kind, host, directory and settings (no secrets)."""
        return {"kind": self.kind, "host": self.host, "directory": self.directory,
                "ssh_config": self.ssh_config, "host_key_policy": self.host_key_policy}

    def save(self, name: str, overwrite: bool = False) -> Path:
        """Save this server as ``name`` (``$CRIMPL_HOME/servers/<name>.json``, mode 0600).

        :param overwrite: replace a server saved under the same name.
        :raises ConfigError: if the name is not valid, or taken and ``overwrite`` is False.
        """
        path = _server_path(name)
        if path.exists() and not overwrite:
            raise ConfigError(f"a server named {name} is saved already ({path}): pass overwrite=True "
                              "to replace it")
        write_private_file(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _server_path(name) -> Path:
    if not is_valid_name(name):
        raise ConfigError(f"server name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
                          "(at most 63 characters, starting with a letter or digit)")
    return crimpl_home() / "servers" / f"{name}.json"


def list_servers() -> list[str]:
    """Return the names of the saved remote servers, sorted."""
    folder = crimpl_home() / "servers"
    return sorted(p.stem for p in folder.glob("*.json") if is_valid_name(p.stem)) if folder.is_dir() else []


def load_server(name: str) -> RemoteThreadServer:
    """Return the remote server saved as ``name``.

    :raises ConfigError: if there is none, or its file is not one crimpl wrote.
    """
    path = _server_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no saved server named {name}; saved: {', '.join(list_servers()) or 'none'}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): save the server again") from exc
    # Each kind is a subclass (crimpl.slurm's too, imported with crimpl).
    kinds = {kind.kind: kind for kind in (RemoteThreadServer, *RemoteThreadServer.__subclasses__())}
    if not isinstance(data, dict) or data.get("kind") not in kinds:
        raise ConfigError(f"{path} is not a saved crimpl server: save the server again")
    fields = {k: data[k] for k in ("directory", "ssh_config", "host_key_policy") if data.get(k) is not None}
    try:
        return kinds[data["kind"]](data.get("host"), **fields)
    except ConfigError as exc:
        raise ConfigError(f"{path} holds a bad setting ({exc}): save the server again") from exc
