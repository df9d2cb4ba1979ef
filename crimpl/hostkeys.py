"""Host keys: generate one per instance, hand it to cloud-init, pin it per instance.

crimpl creates the instance's ed25519 host key itself and passes it in the user
data as cloud-init ``ssh_keys``, so the very first SSH connection is verified.
The public half is pinned by *instance id* in ``$CRIMPL_HOME/known_hosts`` (an
OpenSSH known_hosts file whose host field is the instance id) and is also kept
in the instance's ``crimpl:host-key`` tag, so another machine of the same
account can verify the instance too.

That private key travels in the user data, which anyone allowed to describe
the instance can read, so crimpl replaces it right after the first verified
connection (:func:`rotate`); from then on the tag and the pin hold only the
server's own new key.
"""

import base64
import shlex
import textwrap
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import CrimplError
from .home import crimpl_home, write_private_file
from .log import warn

def generate_host_key() -> tuple:
    """Return a new ed25519 host key as ``(private_openssh_pem, public_line)``."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    return private, public


def public_line_of(private_pem: str) -> str:
    """Return the ``ssh-ed25519 AAAA...`` public line of an OpenSSH private key."""
    key = serialization.load_ssh_private_key(private_pem.encode(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def cloud_init_user_data(private_pem: str, public_line: str, extra: str = "") -> str:
    """Return ``#cloud-config`` user data that installs the given host key.

    ``ssh_genkeytypes: []`` stops cloud-init from generating other host key
    types, so the server can only present the key crimpl pinned.

    :param extra: more cloud-config keys, appended (the watchdog's ``write_files``
        and ``runcmd``, from :func:`crimpl.watchdog.cloud_config`).
    """
    indented = textwrap.indent(private_pem.strip() + "\n", "    ")
    return (
        "#cloud-config\n"
        "ssh_deletekeys: true\n"
        "ssh_genkeytypes: []\n"
        "ssh_keys:\n"
        "  ed25519_private: |\n"
        f"{indented}"
        f"  ed25519_public: {public_line.strip()}\n"
        f"{extra}"
    )


def known_hosts_path() -> Path:
    """Return the path of crimpl's own known_hosts file."""
    return crimpl_home() / "known_hosts"


def public_line(key: paramiko.PKey) -> str:
    """Return the ``ssh-ed25519 AAAA...`` line of a :class:`paramiko.PKey`."""
    return f"{key.get_name()} {key.get_base64()}"


def same_key(one: paramiko.PKey, other: paramiko.PKey) -> bool:
    """Tell whether two :class:`paramiko.PKey` objects are the same public key."""
    return one.get_name() == other.get_name() and one.asbytes() == other.asbytes()


def key_from_line(public_line: str) -> paramiko.PKey:
    """Return the :class:`paramiko.PKey` of an OpenSSH public key line (``ssh-ed25519 AAAA...``)."""
    key_type, blob = public_line.split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))


def keys_from_text(text: str | None) -> list:
    """Return the keys of ``text``: one or more ``type base64`` pairs separated by spaces.

    This is the form of the ``crimpl:host-key`` tag, which holds two keys while
    the key is being replaced. Other words (an OpenSSH comment) and pairs that
    are not a valid key are skipped.
    """
    words = (text or "").split()
    keys = []
    for i, word in enumerate(words[:-1]):
        if word.startswith(("ssh-", "ecdsa-", "sk-")):
            try:
                keys.append(key_from_line(f"{word} {words[i + 1]}"))
            except (ValueError, paramiko.SSHException):
                continue
    return keys


#: Key types paramiko reads: a line of another type is valid but unusable, not broken.
_KNOWN_TYPES = {"ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                "ecdsa-sha2-nistp521", "ssh-dss"}
#: What has been warned about in this process (a file and its content).
_warned = set()


def _read_known_hosts(path):
    """Return the ``(hostname, key)`` pairs of an OpenSSH known_hosts file, in file order.

    A line paramiko cannot read is skipped, with one warning per file and
    content: a hand-edited typo must not make every command fail.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        _warn_once(path, f"cannot read {path} ({exc.strerror or exc}): its host keys are ignored")
        return []
    pairs, bad = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except Exception:  # noqa: BLE001 - paramiko raises several types for a corrupt line
            entry = None
        if entry is None:
            # Fewer than three fields or a corrupt key: a broken line. (A key type
            # paramiko does not know is a valid line it cannot use: skipped quietly.)
            if len(line.split()) < 3 or line.split()[1] in _KNOWN_TYPES:
                bad.append(lineno)
            continue
        pairs += [(name, entry.key) for name in entry.hostnames]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        _warn_once((path, text), f"skipped {len(bad)} unreadable line(s) of {path} (line {shown}): "
                                 "fix or delete them")
    return pairs


def _warn_once(what, message):
    if what not in _warned:
        _warned.add(what)
        warn(message)


def user_known_hosts(path: str = "~/.ssh/known_hosts") -> list:
    """Return the ``(hostname, key)`` pairs of the user's OpenSSH known_hosts (for bastions)."""
    return _read_known_hosts(Path(path).expanduser())


def _load_pins():
    pins = {}
    for name, key in _read_known_hosts(known_hosts_path()):
        if not any(same_key(key, k) for k in pins.get(name, [])):
            pins.setdefault(name, []).append(key)
    return pins


def _save_pins(pins):
    lines = [f"{host} {public_line(key)}\n" for host, keys in pins.items() for key in keys]
    write_private_file(known_hosts_path(), "".join(lines))


def pinned_keys(instance_id: str) -> list:
    """Return the keys pinned for ``instance_id``, oldest first (empty when none)."""
    return _load_pins().get(instance_id, [])


def pinned_key(instance_id: str) -> paramiko.PKey | None:
    """Return the newest key pinned for ``instance_id``, or None."""
    keys = pinned_keys(instance_id)
    return keys[-1] if keys else None


def pin(instance_id: str, public_keys: str) -> None:
    """Record the host key(s) of ``instance_id``, replacing any earlier pin.

    :param public_keys: one ``ssh-ed25519 AAAA...`` line, or several keys as in
        the ``crimpl:host-key`` tag (see :func:`keys_from_text`).
    """
    keys = keys_from_text(public_keys)
    if not keys:
        raise ValueError(f"no public key in {public_keys!r}")
    pins = _load_pins()
    pins[instance_id] = keys
    _save_pins(pins)


def unpin(instance_id: str) -> None:
    """Forget the host key of ``instance_id`` (after it is terminated)."""
    pins = _load_pins()
    if instance_id in pins:
        del pins[instance_id]
        _save_pins(pins)


def trusted_keys(instance_id: str, tagged: str | None = None) -> list:
    """Return the host keys to accept for ``instance_id``, keeping the pin file in step.

    The instance's ``crimpl:host-key`` tag (``tagged``) is the source of truth:
    it follows the key replacement, so a machine that pinned the key from the
    user data learns the new one, and stops accepting the old one once the tag
    drops it. Without a tag (an image without cloud-init), the pins decide.
    """
    if not tagged:
        return pinned_keys(instance_id)
    keys = keys_from_text(tagged)
    pinned = pinned_keys(instance_id)
    if len(pinned) != len(keys) or not all(map(same_key, pinned, keys)):
        pin(instance_id, tagged)
    return keys


# ---------------------------------------------------------------------------
# Replacing the key that travelled in the user data

#: The instance tag holding the public host key(s) to accept.
HOST_KEY_TAG = "crimpl:host-key"
#: The instance tag that marks the key from the user data as replaced.
ROTATED_TAG = "crimpl:host-key-rotated"

# Both scripts run as root with the host key file as $1 and sshd's pid file as $2
# (empty: reload sshd through systemd). They can run again after a crash at any point.
_PREPARE = """set -e
new="$1.crimpl-new"
if ! ssh-keygen -y -f "$new" > /dev/null 2>&1; then
  rm -f "$new" "$new.pub"
  ssh-keygen -q -t ed25519 -N '' -C '' -f "$new" > /dev/null
fi
ssh-keygen -y -f "$new"
"""
_COMMIT = """set -e
new="$1.crimpl-new"
if [ -f "$new" ]; then
  ssh-keygen -y -f "$new" > "$new.pub"
  mv -f "$new.pub" "$1.pub"
  mv -f "$new" "$1"
fi
if [ -n "$2" ]; then
  kill -HUP "$(cat "$2")"
else
  systemctl reload ssh || systemctl reload sshd || kill -HUP "$(cat /run/sshd.pid)"
fi
"""


def _as_root(conn, script):
    """Run ``script`` as root on the server; return its stdout, or raise RuntimeError with its error."""
    # The key file and pid file are read in the login shell: sudo resets the environment.
    command = (
        'k="${CRIMPL_HOST_KEY_FILE:-/etc/ssh/ssh_host_ed25519_key}"; p="${CRIMPL_SSHD_PIDFILE:-}"; '
        'if [ "$(id -u)" = 0 ]; then set --; else set -- sudo -n; fi; '
        f'"$@" sh -c {shlex.quote(script)} crimpl-host-key "$k" "$p"'
    )
    result = conn.run(command, hide=True, warn=True, in_stream=False)
    if result.exited != 0:
        lines = (result.stderr.strip() or f"exit code {result.exited}").splitlines()
        raise RuntimeError(lines[-1])
    return result.stdout


def rotate(conn, instance_id: str, tags: dict, set_tags) -> None:
    """Replace the host key that came in the user data; one step per call, safe to interrupt.

    The private key in the user data can be read by anyone allowed to describe
    the instance, and through the metadata service on the instance, so crimpl
    uses it only to verify the first connection. Over that verified channel:

    1. the server generates a new key beside its current one (``<key>.crimpl-new``)
       and prints the public half;
    2. crimpl pins both keys and puts both in the ``crimpl:host-key`` tag;
    3. the server moves the new key into place and reloads sshd.

    At the next connection, verified with the new key, the old key is dropped
    from the pin and the tag, and the ``crimpl:host-key-rotated`` tag is set.
    At every point the server presents a key that the pin and the tag accept.
    A failure (no root, no sudo) is reported as a warning and retried next time.

    :param conn: an open Connection to the instance, verified against ``tags``.
    :param tags: the instance's tags.
    :param set_tags: ``set_tags({key: value})`` writes instance tags (EC2 CreateTags).
    """
    tagged = keys_from_text(tags.get(HOST_KEY_TAG, ""))
    if not tagged or tags.get(ROTATED_TAG) == "true":
        return
    presented = conn.client.get_transport().get_remote_server_key()
    try:
        if len(tagged) > 1 and same_key(presented, tagged[-1]):
            new = public_line(tagged[-1])
            set_tags({HOST_KEY_TAG: new, ROTATED_TAG: "true"})
            pin(instance_id, new)
            return
        if len(tagged) == 1:
            new = public_line(keys_from_text(_as_root(conn, _PREPARE))[0])
            both = f"{public_line(tagged[0])} {new}"
            pin(instance_id, both)
            set_tags({HOST_KEY_TAG: both})
        _as_root(conn, _COMMIT)
    except (RuntimeError, IndexError, CrimplError, OSError, EOFError, paramiko.SSHException) as exc:
        warn(f"could not replace the host key of {instance_id} that came in its user data "
             f"({exc}); crimpl tries again at the next connection")
