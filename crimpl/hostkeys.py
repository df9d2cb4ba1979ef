"""Host keys: generate one per instance, hand it to cloud-init, pin it per instance.

crimpl creates the instance's ed25519 host key itself and passes it in the user
data as cloud-init ``ssh_keys``, so the very first SSH connection is verified.
The public half is pinned by *instance id* in ``$CRIMPL_HOME/known_hosts`` (an
OpenSSH known_hosts file whose host field is the instance id) and is also kept
in the instance's ``crimpl:host-key`` tag, so another machine of the same
account can verify the instance too.
"""

import base64
import textwrap

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .home import crimpl_home, write_private_file

HOST_KEY_TYPE = "ssh-ed25519"


def generate_host_key():
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


def public_line_of(private_pem):
    """Return the ``ssh-ed25519 AAAA...`` public line of an OpenSSH private key."""
    key = serialization.load_ssh_private_key(private_pem.encode(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def cloud_init_user_data(private_pem, public_line):
    """Return ``#cloud-config`` user data that installs the given host key.

    ``ssh_genkeytypes: []`` stops cloud-init from generating other host key
    types, so the server can only present the key crimpl pinned.
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
    )


def host_key_from_user_data(user_data):
    """Return ``(private_pem, public_line)`` from crimpl's cloud-config user data, or None."""
    if not user_data or "ed25519_private: |" not in user_data:
        return None
    lines = user_data.splitlines()
    start = lines.index("  ed25519_private: |") + 1
    private_lines = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        private_lines.append(line[4:])
    public = next(
        line.split(":", 1)[1].strip() for line in lines if line.startswith("  ed25519_public:")
    )
    return "\n".join(private_lines) + "\n", public


def known_hosts_path():
    """Return the path of crimpl's own known_hosts file."""
    return crimpl_home() / "known_hosts"


def _load():
    keys = paramiko.HostKeys()
    path = known_hosts_path()
    if path.exists():
        keys.load(str(path))
    return keys


def pinned_key(instance_id):
    """Return the pinned :class:`paramiko.PKey` of ``instance_id``, or None."""
    entry = _load().lookup(instance_id)
    if not entry:
        return None
    return entry.get(HOST_KEY_TYPE) or next(iter(entry.values()))


def key_from_line(public_line):
    """Return the :class:`paramiko.PKey` of an OpenSSH public key line (``ssh-ed25519 AAAA...``)."""
    key_type, blob = public_line.split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(blob))


def pin(instance_id, public_line):
    """Record ``public_line`` as the host key of ``instance_id``, replacing any earlier pin."""
    keys = _load()
    key = key_from_line(public_line)
    keys[instance_id] = {key.get_name(): key}
    _save(keys)


def unpin(instance_id):
    """Forget the host key of ``instance_id`` (after it is terminated)."""
    keys = _load()
    if instance_id in keys:
        del keys[instance_id]
        _save(keys)


def _save(keys):
    lines = [f"{host} {key_type} {key.get_base64()}\n"
             for host in keys for key_type, key in keys[host].items()]
    write_private_file(known_hosts_path(), "".join(lines))

