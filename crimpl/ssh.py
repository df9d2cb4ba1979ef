"""fabric Connections to crimpl servers: user, key, ssh config, pinned host keys, readiness.

Host keys are verified, never silently accepted. The key expected for an
instance is looked up by *instance id* (see :mod:`crimpl.hostkeys`), not by the
address paramiko connects to, which may be an ssh-config alias, a jump host's
target or ``[127.0.0.1]:port``, and whose public IP another instance may get
after a stop. A key that does not match stops the connection before
authentication: nothing is sent.
"""

import os
import socket
import time
from pathlib import Path

import paramiko
from fabric import Config, Connection

from . import hostkeys
from .errors import HostKeyMismatchError, SSHError, SSHNotReadyError

#: Seconds between two connection attempts while an instance boots.
RETRY_INTERVAL = 1.0
#: Seconds one TCP connect may take before it counts as a failed attempt.
CONNECT_TIMEOUT = 10


def ssh_config_file(configured=None):
    """Return the OpenSSH config to honour: the config's ``ssh_config``, else
    ``$CRIMPL_SSH_CONFIG``, else None (fabric then reads ``~/.ssh/config``)."""
    path = configured or os.environ.get("CRIMPL_SSH_CONFIG")
    if not path:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise SSHError(f"SSH config {path} does not exist: fix CRIMPL_SSH_CONFIG or ssh_config")
    return str(path)


def fingerprint(key):
    """Return the OpenSSH-style ``SHA256:...`` fingerprint of a paramiko key."""
    return key.fingerprint


class PinnedHostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Accept only the host key pinned for one instance.

    The client holds no other known hosts, so paramiko asks this policy about
    every server key; the policy compares it with the instance's pinned key.

    :param instance_id: the instance the key is pinned for.
    :param expected: the pinned :class:`paramiko.PKey`, or None if none is pinned yet.
    :param accept_new: pin the first key seen when none is pinned (opt-in, for
        images without cloud-init).
    """

    def __init__(self, instance_id, expected, accept_new=False):
        self.instance_id = instance_id
        self.expected = expected
        self.accept_new = accept_new

    def missing_host_key(self, client, hostname, key):
        if self.expected is None:
            if not self.accept_new:
                raise HostKeyMismatchError(
                    f"no host key is pinned for {self.instance_id} (server at {hostname} offers "
                    f"{fingerprint(key)}): refusing to connect; set host_key_policy='accept-new' "
                    "only for images without cloud-init"
                )
            hostkeys.pin(self.instance_id, f"{key.get_name()} {key.get_base64()}")
            self.expected = key
            return
        if key.get_name() != self.expected.get_name() or key.asbytes() != self.expected.asbytes():
            raise HostKeyMismatchError(
                f"host key of {self.instance_id} at {hostname} does not match the pinned key "
                f"(offered {fingerprint(key)}, pinned {fingerprint(self.expected)}): refusing to "
                "connect; someone may be intercepting, or the server was rebuilt outside crimpl"
            )


def connection(host, user, key_file, instance_id, *, ssh_config=None, expected_key=None,
               accept_new=False, port=None):
    """Return an unopened fabric :class:`~fabric.Connection` that verifies the pinned host key.

    :param host: address or ssh-config alias of the instance.
    :param user: login user.
    :param key_file: private key to log in with.
    :param instance_id: whose pinned key to expect.
    :param ssh_config: OpenSSH config file to honour (ProxyJump, HostName, Port ...).
    :param expected_key: the pinned key; looked up in ``$CRIMPL_HOME/known_hosts`` when None.
    :param accept_new: pin the first key seen if none is pinned.
    :param port: SSH port, when neither 22 nor the ssh config's.
    """
    path = ssh_config_file(ssh_config)
    config = Config(runtime_ssh_path=path) if path else Config()
    expected = expected_key or hostkeys.pinned_key(instance_id)
    connect_kwargs = {"key_filename": str(key_file), "look_for_keys": False, "allow_agent": False}
    if expected is not None:
        # Ask only for the pinned key's type: a server with several host keys
        # would otherwise offer whichever type paramiko prefers.
        others = [k for k in paramiko.Transport._preferred_keys if k != expected.get_name()]
        connect_kwargs["disabled_algorithms"] = {"keys": others}
    conn = Connection(host, user=user, port=port, config=config, connect_timeout=CONNECT_TIMEOUT,
                      connect_kwargs=connect_kwargs)
    # fabric accepts unknown host keys by default; crimpl never does.
    conn.client = paramiko.SSHClient()
    conn.client.set_missing_host_key_policy(PinnedHostKeyPolicy(instance_id, expected, accept_new))
    if isinstance(conn.gateway, Connection):
        # A bastion from ProxyJump is verified against the user's own known_hosts.
        conn.gateway.client = paramiko.SSHClient()
        conn.gateway.client.load_system_host_keys()
        conn.gateway.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return conn


def open_when_ready(conn, timeout, interval=RETRY_INTERVAL):
    """Open ``conn``, retrying while the server is not up yet, for at most ``timeout`` seconds.

    A host key mismatch is never retried.

    :raises SSHNotReadyError: naming how long it waited and the last error.
    """
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            conn.open()
            return conn
        except HostKeyMismatchError:
            conn.close()
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            last = exc
            conn.close()
        waited = time.monotonic() - started
        if waited + interval > timeout:
            raise SSHNotReadyError(
                f"SSH to {conn.user}@{conn.host} not ready after {waited:.0f} s ({attempts} tries); "
                f"last error: {_describe(last)}. Check the instance is running and its security "
                "group allows your address, or raise ssh_timeout"
            )
        time.sleep(interval)


def _describe(exc):
    text = str(exc) or type(exc).__name__
    if isinstance(exc, socket.timeout):
        text = "connection timed out"
    return text.splitlines()[0]


def interactive_command(host, user, key_file, instance_id, ssh_config=None):
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
