"""fabric Connections to crimpl servers: user, key, ssh config, pinned host keys, readiness.

Host keys are verified, never silently accepted. The key expected for an
instance is looked up by *instance id* (see :mod:`crimpl.hostkeys`), not by the
address paramiko connects to, which may be an ssh-config alias, a jump host's
target or ``[127.0.0.1]:port``, and whose public IP another instance may get
after a stop. A key that does not match stops the connection before
authentication: nothing is sent.
"""

import contextlib
import contextvars
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from fabric import Config, Connection

from . import hostkeys
from .errors import HostKeyMismatchError, SSHError, SSHNotReadyError
from .log import say

#: Seconds between two connection attempts while an instance boots.
RETRY_INTERVAL = 1.0
#: Seconds one TCP connect may take before it counts as a failed attempt.
CONNECT_TIMEOUT = 10
#: Seconds between two "waiting for SSH" lines while an instance boots.
PROGRESS_EVERY = 10.0
#: The cipher asked for first (the others stay allowed): paramiko's AES-GCM moved
#: bulk data about 12% faster up and 25% faster down than its default AES-CTR
#: with HMAC in docs/benchmarks.md.
PREFERRED_CIPHER = "aes128-gcm@openssh.com"


def ssh_config_file(configured: str | None = None) -> str | None:
    """Return the OpenSSH config to honour: the config's ``ssh_config``, else
    ``$CRIMPL_SSH_CONFIG``, else None (fabric then reads ``~/.ssh/config``)."""
    path = configured or os.environ.get("CRIMPL_SSH_CONFIG")
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSHError(f"SSH config {path} does not exist: fix CRIMPL_SSH_CONFIG or ssh_config")
    return str(path)


def fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH-style ``SHA256:...`` fingerprint of a paramiko key."""
    return key.fingerprint


class PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Accept only a host key pinned for one instance.

    The client holds no other known hosts, so paramiko asks this policy about
    every server key; the policy compares it with the instance's pinned keys
    (one, or two while crimpl replaces the key from the user data).

    :param instance_id: the instance the keys are pinned for.
    :param expected: the pinned :class:`paramiko.PKey` objects (empty if none is pinned yet).
    :param accept_new: pin the first key seen when none is pinned (opt-in, for
        images without cloud-init).
    """

    def __init__(self, instance_id, expected, accept_new=False):
        self.instance_id = instance_id
        self.expected = list(expected)
        self.accept_new = accept_new

    def missing_host_key(self, client, hostname, key):
        if not self.expected:
            if not self.accept_new:
                raise HostKeyMismatchError(
                    f"no host key is pinned for {self.instance_id} (server at {hostname} offers "
                    f"{fingerprint(key)}): refusing to connect; set host_key_policy='accept-new' "
                    "only for images without cloud-init"
                )
            hostkeys.pin(self.instance_id, hostkeys.public_line(key))
            self.expected = [key]
            return
        if not any(hostkeys.same_key(key, pinned) for pinned in self.expected):
            pinned = ", ".join(fingerprint(k) for k in self.expected)
            raise HostKeyMismatchError(
                f"host key of {self.instance_id} at {hostname} does not match the pinned key "
                f"(offered {fingerprint(key)}, pinned {pinned}): refusing to "
                "connect; someone may be intercepting, or the server was rebuilt outside crimpl"
            )


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse a bastion whose host key is not in the user's known_hosts, as OpenSSH's
    ``StrictHostKeyChecking yes`` does."""

    def missing_host_key(self, client, hostname, key):
        raise HostKeyMismatchError(
            f"the bastion {hostname} offers host key {fingerprint(key)}, which is not in "
            "~/.ssh/known_hosts: check it and add it (connect once with ssh), then retry"
        )


def connection(host: str, user: str, key_file, instance_id: str, *, ssh_config: str | None = None,
               expected_key=None, accept_new: bool = False, port: int | None = None) -> Connection:
    """Return an unopened fabric :class:`~fabric.Connection` that verifies the pinned host key.

    :param host: address or ssh-config alias of the instance.
    :param user: login user.
    :param key_file: private key to log in with.
    :param instance_id: whose pinned key to expect.
    :param ssh_config: OpenSSH config file to honour (ProxyJump, HostName, Port ...).
    :param expected_key: the pinned key, or a list of keys any of which the server may
        present; looked up in ``$CRIMPL_HOME/known_hosts`` when None.
    :param accept_new: pin the first key seen if none is pinned.
    :param port: SSH port, when neither 22 nor the ssh config's.
    """
    path = ssh_config_file(ssh_config)
    config = Config(runtime_ssh_path=path) if path else Config()
    if expected_key is None:
        expected = hostkeys.pinned_keys(instance_id)
    elif isinstance(expected_key, paramiko.PKey):
        expected = [expected_key]
    else:
        expected = list(expected_key)
    connect_kwargs = {"key_filename": str(key_file), "look_for_keys": False, "allow_agent": False,
                      "transport_factory": CountingTransport}
    if expected:
        # Ask only for the pinned keys' types: a server with several host keys
        # would otherwise offer whichever type paramiko prefers.
        types = {k.get_name() for k in expected}
        others = [k for k in paramiko.Transport._preferred_keys if k not in types]
        connect_kwargs["disabled_algorithms"] = {"keys": others}
    conn = Connection(host, user=user, port=port, config=config, connect_timeout=CONNECT_TIMEOUT,
                      connect_kwargs=connect_kwargs)
    # fabric accepts unknown host keys by default; crimpl never does.
    conn.client = paramiko.SSHClient()
    conn.client.set_missing_host_key_policy(PinnedHostKeyPolicy(instance_id, expected, accept_new))
    if isinstance(conn.gateway, Connection):
        # A bastion from ProxyJump is verified against the user's own known_hosts
        # (read line by line: one bad line there must not stop every command).
        conn.gateway.client = paramiko.SSHClient()
        for name, key in hostkeys.user_known_hosts():
            conn.gateway.client.get_host_keys().add(name, key.get_name(), key)
        conn.gateway.client.set_missing_host_key_policy(KnownHostsPolicy())
    return conn


@dataclass
class RoundTrips:
    """What one call cost on the wire: the SSH connections and exec channels it opened.

    :param connections: SSH connections opened (authenticated sessions to the server;
        a ProxyJump hop is not counted apart).
    :param channels: exec channels opened on them, one per remote command.
    """

    connections: int = 0
    channels: int = 0


# The tallies open in this thread (or task): each connection and channel counts in all of them.
_tallies: contextvars.ContextVar[tuple] = contextvars.ContextVar("crimpl_round_trips", default=())


@contextlib.contextmanager
def counted():
    """Count the SSH connections and exec channels opened in the block, in this thread.

    Yields a :class:`RoundTrips` that is filled as they open; blocks may nest.
    """
    tally = RoundTrips()
    token = _tallies.set((*_tallies.get(), tally))
    try:
        yield tally
    finally:
        _tallies.reset(token)


def count(connections: int = 0, channels: int = 0) -> None:
    """Add to every tally open in this thread (see :func:`counted`)."""
    for tally in _tallies.get():
        tally.connections += connections
        tally.channels += channels


class CountingTransport(paramiko.Transport):
    """A paramiko Transport that offers :data:`PREFERRED_CIPHER` first and counts its exec channels."""

    def __init__(self, sock, **kwargs):
        super().__init__(sock, **kwargs)
        options = self.get_security_options()
        if PREFERRED_CIPHER in options.ciphers:
            options.ciphers = (PREFERRED_CIPHER, *(c for c in options.ciphers if c != PREFERRED_CIPHER))

    def open_channel(self, kind, *args, **kwargs):
        channel = super().open_channel(kind, *args, **kwargs)
        if kind == "session":
            count(channels=1)
        return channel


def open_when_ready(connect, timeout: float, interval: float = RETRY_INTERVAL,
                    label: str | None = None) -> Connection:
    """Open a connection, retrying while the server is not up yet, for at most ``timeout`` seconds.

    While it waits it says so, once at the first failed try and then every
    :data:`PROGRESS_EVERY` seconds. A host key mismatch is never retried.

    :param connect: an unopened Connection, or a function returning a new one for each
        try (so an address or ssh-config route that appears while the server boots is used).
    :param label: how to name the server in messages (``crimpl-dev (i-0abc...)``);
        default: ``user@host``.
    :return: the open Connection.
    :raises SSHNotReadyError: naming the server, how long it waited and the last error.
    """
    make = connect if callable(connect) and not isinstance(connect, Connection) else lambda: connect
    started = time.monotonic()
    told = None
    attempts = 0
    while True:
        attempts += 1
        conn = make()
        label = label or f"{conn.user}@{conn.host}"
        try:
            with _quiet_paramiko():
                conn.open()
            count(connections=1)
            return conn
        except HostKeyMismatchError:
            conn.close()
            raise
        except paramiko.BadHostKeyException as exc:
            # A known host (a bastion in ~/.ssh/known_hosts) with another key: never retried.
            conn.close()
            raise HostKeyMismatchError(
                f"host key of {exc.hostname} does not match ~/.ssh/known_hosts (offered "
                f"{fingerprint(exc.key)}, known {fingerprint(exc.expected_key)}): refusing to connect"
            ) from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            last = exc
            conn.close()
        waited = time.monotonic() - started
        if waited + interval > timeout:
            raise SSHNotReadyError(
                f"SSH to {label} not ready after {waited:.0f} s ({attempts} tries); "
                f"last error: {_describe(last)}. Check the instance is running and its security "
                "group allows your address, or raise ssh_timeout"
            )
        if told is None or waited - told >= PROGRESS_EVERY:
            say(f"waiting for SSH on {label}: {waited:.0f} s")
            told = waited
        time.sleep(interval)


class _DropAll(logging.Filter):
    def filter(self, record):
        return False


_QUIET = _DropAll()
_quiet_lock = threading.Lock()
_quiet_count = 0


@contextlib.contextmanager
def _quiet_paramiko():
    """Silence paramiko's transport logger while connecting.

    Its thread logs every failed handshake (a port that accepts and closes while
    sshd starts, or behind a bastion) with a full traceback, which Python's
    last-resort handler prints to the terminal. The same error reaches crimpl as
    an exception and ends up, in one line, in :class:`SSHNotReadyError`.
    """
    global _quiet_count
    logger = logging.getLogger("paramiko.transport")
    with _quiet_lock:
        if _quiet_count == 0:
            logger.addFilter(_QUIET)
        _quiet_count += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_count -= 1
            if _quiet_count == 0:
                logger.removeFilter(_QUIET)


def _describe(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout):
        text = "connection timed out"
    return text.splitlines()[0]


def interactive_command(host: str, user: str, key_file, instance_id: str,
                        ssh_config: str | None = None) -> list:
    """Return the OpenSSH argv for an interactive shell with the same host key pinning.

    ``HostKeyAlias`` makes OpenSSH look the key up under the instance id in
    crimpl's known_hosts, exactly as :class:`PinnedHostKeyPolicy` does.
    """
    argv = [
        "ssh", "-i", str(key_file), "-l", user,
        "-o", "IdentitiesOnly=yes",
        "-o", f"HostKeyAlias={instance_id}",
        "-o", f"UserKnownHostsFile={hostkeys.known_hosts_path()}",
        "-o", "StrictHostKeyChecking=yes",
    ]
    path = ssh_config_file(ssh_config)
    if path:
        argv += ["-F", path]
    return argv + [host]

