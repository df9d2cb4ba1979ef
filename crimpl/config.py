"""Account-level settings (:class:`AWSEC2_Config`), saved configs, and the one instance spec.

Lookup order for every setting, in one place:

1. an argument given to the call (``AWSEC2.new(nprocs=..., server_name=...)``)
   or a ``crimpl:`` key of the stack's ``Pulumi.<stack>.yaml``;
2. the :class:`AWSEC2_Config` (given directly, by saved name, or the only saved one);
3. the default written in :mod:`crimpl.stackkeys` (:data:`FIELDS`), where every
   setting and ``crimpl:`` stack key is declared with its type, check and help.

:func:`build_spec` turns these into one :class:`InstanceSpec`; both the boto3
launch path (``crimpl.ec2``) and the Pulumi program (``infra/``) render the
instance from it, so the two cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import pricing
from ._version import __version__
from .errors import ConfigError
from .home import crimpl_home, write_private_file
from .stackkeys import FIELDS, KEYS, check_ssh_cidrs, parse_duration

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class AWSEC2_Config:  # noqa: N801 - the name is the public API users already know
    """Account-level settings for the EC2 servers crimpl launches.

    Field names and defaults are listed in :data:`FIELDS`. Construction validates
    every field and raises :class:`~crimpl.errors.ConfigError` naming the field.
    The object holds names and paths only; it never holds AWS credentials or key
    material, and neither does the file :meth:`save` writes.
    """

    def __init__(self, KeyFile: str | os.PathLike | None = None, **kwargs: Any) -> None:  # noqa: N803
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"AWSEC2_Config got unknown field(s) {', '.join(unknown)}; "
                f"known fields: {', '.join(FIELDS)}"
            )
        values = {**kwargs, "KeyFile": KeyFile}
        for name, key in FIELDS.items():
            setattr(self, name, key.validate(values.get(name)))
        if self.autostop and self.max_lifetime and \
                parse_duration("max_lifetime", self.max_lifetime) < parse_duration("autostop", self.autostop):
            raise ConfigError(f"max_lifetime {self.max_lifetime} is shorter than autostop {self.autostop}: "
                              "the server would never be idle long enough; lengthen max_lifetime")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields that differ from their defaults, as plain JSON values."""
        out = {}
        for name, key in FIELDS.items():
            value = getattr(self, name)
            if value != key.default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def __eq__(self, other):
        return isinstance(other, AWSEC2_Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"AWSEC2_Config({args})"

    def save(self, name: str) -> Path:
        """Save this config as ``name`` in ``$CRIMPL_HOME/configs`` (mode 0600).

        :returns: the path written.
        """
        _check_name(name, "config name")
        path = _configs_dir() / f"{name}.json"
        write_private_file(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, name: str | None = None) -> AWSEC2_Config:
        """Load a saved config by ``name``; with no name, the only saved config.

        :raises ConfigError: if the name is unknown, or no name is given and
            there is not exactly one saved config. The message lists the saved names.
        """
        names = saved_config_names()
        if name is None:
            if len(names) == 1:
                name = names[0]
            elif not names:
                raise ConfigError(
                    "no saved crimpl config: create one with "
                    "crimpl.AWSEC2_Config(KeyFile=...).save('name') or pass config=..."
                )
            else:
                raise ConfigError(
                    f"several saved configs ({', '.join(names)}); choose one with config='name'"
                )
        if not isinstance(name, str):
            raise ConfigError(f"config name must be a string, got {type(name).__name__}")
        if name not in names:
            listed = ", ".join(names) if names else "none"
            raise ConfigError(f"no saved config named {name!r}; saved configs: {listed}")
        path = _configs_dir() / f"{name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"saved config {path} cannot be read ({exc}); save it again") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"saved config {path} is not a JSON object; save it again")
        return cls(**data)


def saved_config_names() -> list[str]:
    """Return the names of the saved configs, sorted."""
    return sorted(p.stem for p in _configs_dir().glob("*.json"))


def resolve_config(config: AWSEC2_Config | str | None = None) -> AWSEC2_Config:
    """Return an :class:`AWSEC2_Config` from an object, a saved name, or the only saved one."""
    if config is None or isinstance(config, str):
        return AWSEC2_Config.load(config)
    if isinstance(config, AWSEC2_Config):
        return config
    raise ConfigError(
        f"config must be an AWSEC2_Config or a saved config name, got {type(config).__name__}"
    )


def _configs_dir():
    path = crimpl_home() / "configs"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{path} is not a folder ({exc.strerror}): move it away so crimpl can save configs"
        ) from exc
    return path


def is_valid_name(name: object) -> bool:
    """Return True if ``name`` may name a config, a server or a job."""
    return isinstance(name, str) and bool(_NAME.match(name))


def _check_name(name, what):
    if not is_valid_name(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )


def public_key_of(key_file: str | os.PathLike) -> str:
    """Return the OpenSSH public key line for the private key ``key_file``.

    ``<key_file>.pub`` is used when present; otherwise the key is derived from
    the private key (which must not be passphrase-protected).
    """
    import paramiko  # paramiko is cheap, but only this path needs it

    pub = Path(f"{key_file}.pub")
    if pub.is_file():
        return " ".join(pub.read_text(encoding="utf-8").split()[:2])
    try:
        key = paramiko.PKey.from_path(key_file)
    except (paramiko.SSHException, OSError, ValueError) as exc:
        raise ConfigError(
            f"KeyFile: cannot read a public key from {key_file} ({exc}); put it beside it as {pub}"
        ) from exc
    return f"{key.get_name()} {key.get_base64()}"


# ---------------------------------------------------------------------------
# The one instance spec

#: The instance tag holding a node's rank, ``0`` to ``N-1``; an instance without it is rank 0.
NODE_RANK_TAG = "crimpl:node-rank"
#: The instance tag naming the placement group crimpl created for the server (destroy deletes it).
PLACEMENT_TAG = "crimpl:placement-group"
#: The instance tag holding the public host key(s) to accept: :data:`crimpl.hostkeys.HOST_KEY_TAG`,
#: written here too because importing that module costs paramiko.
HOST_KEY_TAG = "crimpl:host-key"


@dataclass(frozen=True)
class InstanceSpec:
    """Everything that defines one crimpl instance, whichever provisioner creates it.

    A server of ``nnodes`` nodes is one spec: the fields describe rank 0, and
    :meth:`node` returns the spec of another rank (its own host key, user data
    and ``crimpl:node-rank`` tag; everything else is the same).
    """

    server_name: str
    instance_type: str
    username: str
    volume_size: int
    user_data: str
    host_public_key: str
    tags: dict[str, str] = field(hash=False)
    image_id: str | None = None  # None: the newest Ubuntu LTS image, looked up at launch
    key_name: str | None = None  # None: import public_key as key_pair_name
    public_key: str | None = None
    subnet_id: str | None = None
    security_group_id: str | None = None  # None: create security_group_name for ssh_cidrs
    ssh_cidrs: tuple[str, ...] = ()  # empty: the caller's address /32, found at launch
    spot: bool = False
    region: str | None = None
    shutdown_behavior: str = "stop"
    nnodes: int = 1
    placement: str | None = None  # "cluster": the nodes go in placement_group_name
    rank: int = 0
    #: Per rank: the user data (it carries that rank's host private key) and the public host key.
    node_user_data: tuple[str, ...] = field(default=(), repr=False)
    node_host_keys: tuple[str, ...] = ()

    def node(self, rank: int) -> InstanceSpec:
        """Return the spec of node ``rank`` (0 to ``nnodes - 1``).

        :raises ConfigError: for a rank the server does not have.
        """
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < len(self.node_host_keys):
            raise ConfigError(f"{self.server_name} has nodes 0 to {self.nnodes - 1}, not {rank!r}")
        public = self.node_host_keys[rank]
        return dataclasses.replace(
            self, rank=rank, user_data=self.node_user_data[rank], host_public_key=public,
            tags={**self.tags, HOST_KEY_TAG: public, NODE_RANK_TAG: str(rank)},
        )

    @property
    def nodes(self) -> tuple[InstanceSpec, ...]:
        """The spec of every node, rank 0 first."""
        return tuple(self.node(rank) for rank in range(self.nnodes))

    @property
    def key_pair_name(self) -> str:
        """Name of the key pair crimpl imports when no ``KeyName`` is given."""
        return self.key_name or f"crimpl-{self.server_name}"

    @property
    def security_group_name(self) -> str:
        """Name of the SSH security group crimpl creates when none is given."""
        return f"crimpl-{self.server_name}-ssh"

    @property
    def placement_group_name(self) -> str | None:
        """Name of the placement group crimpl creates for ``placement``; None without one."""
        return f"crimpl-{self.server_name}-{self.placement}" if self.placement else None


#: Canonical's AWS account, which publishes the official Ubuntu images.
UBUNTU_OWNER = "099720109477"
#: Name pattern of Canonical's amd64 server images on EBS (gp2 and gp3 variants).
UBUNTU_NAME_PATTERN = "ubuntu/images/hvm-ssd*/ubuntu-*-amd64-server-*"


def generate_server_name() -> str:
    """Return a readable, unique-enough server name such as ``crimpl-7f3a2c``."""
    return f"crimpl-{secrets.token_hex(3)}"


def crimpl_tags(server_name: str, host_public_key: str, username: str,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the tags every crimpl instance carries (user tags first, crimpl's win)."""
    tags = dict(extra or {})
    tags.update({
        "Name": server_name,
        "crimpl:managed": "true",
        "crimpl:name": server_name,
        "crimpl:version": __version__,
        "crimpl:user": username,
        HOST_KEY_TAG: host_public_key,
    })
    return tags


def node_host_key(host_key: tuple[str, str], rank: int) -> tuple[str, str]:
    """Return the ed25519 host key of node ``rank`` as ``(private_openssh_pem, public_line)``.

    Rank 0's is ``host_key`` itself; another rank's is derived from it (HKDF-SHA256
    of its private key, per rank), so a stack keeps one secret (``crimpl:hostKey``)
    however many nodes it has, and every run of the Pulumi program renders the
    same user data. Each node still has its own key, pinned by its own instance id.
    """
    if rank == 0:
        return host_key
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    base = serialization.load_ssh_private_key(host_key[0].encode(), password=None)
    secret = base.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"crimpl node-rank {rank}".encode()).derive(secret)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    return _openssh_private_pem(seed, key.public_key().public_bytes_raw()), public


def _openssh_private_pem(seed: bytes, public: bytes) -> str:
    """Return the unencrypted OpenSSH private key file of an ed25519 key, the same bytes every time.

    ``cryptography`` writes the format's two "check" integers at random, which would
    change the user data of every node at every run of the Pulumi program; here they
    are taken from the key (they only tell a wrong passphrase, and there is none).
    """
    import base64
    import hashlib
    import struct
    import textwrap

    def string(data):
        return struct.pack(">I", len(data)) + data

    key_type = b"ssh-ed25519"
    check = hashlib.sha256(seed).digest()[:4]
    private = check + check + string(key_type) + string(public) + string(seed + public) + string(b"")
    private += bytes(range(1, 1 + (-len(private) % 8)))  # the format's padding: 1, 2, 3, ...
    blob = (b"openssh-key-v1\0" + string(b"none") + string(b"none") + string(b"") + struct.pack(">I", 1)
            + string(string(key_type) + string(public)) + string(private))
    body = "\n".join(textwrap.wrap(base64.b64encode(blob).decode(), 70))
    return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n"


def build_spec(config: AWSEC2_Config, *, nprocs: int | None = None, server_name: str | None = None,
               host_key: tuple[str, str] | None = None, instance_type: str | None = None,
               ssh_cidrs: list[str] | tuple[str, ...] | None = None) -> InstanceSpec:
    """Return the :class:`InstanceSpec` for ``config`` and the per-server arguments.

    :param config: an :class:`AWSEC2_Config`.
    :param nprocs: processors wanted; picks the cheapest type (``InstanceType`` wins).
    :param server_name: unique name of the server; generated when None.
    :param host_key: ``(private_pem, public_line)``; a new key is generated when None.
    :param instance_type: explicit type, overriding both ``nprocs`` and ``config.InstanceType``.
    :param ssh_cidrs: CIDRs allowed to SSH, overriding ``config.ssh_cidrs``.
    """
    from . import watchdog
    from .hostkeys import cloud_init_user_data, generate_host_key

    server_name = server_name or generate_server_name()
    _check_name(server_name, "server name")
    chosen_type = instance_type or config.InstanceType
    if chosen_type is None:
        if nprocs is None:
            raise ConfigError("give nprocs (processors wanted) or InstanceType")
        chosen_type = pricing.instance_type_for(nprocs)
    elif nprocs is not None:
        # Still reject a nonsensical nprocs, but not one beyond the table: the type is the user's choice.
        pricing.check_nprocs(nprocs)
    host_key = host_key or generate_host_key()
    autostop = parse_duration("autostop", config.autostop) if config.autostop else 0
    lifetime = parse_duration("max_lifetime", config.max_lifetime) if config.max_lifetime else 0
    cidrs = check_ssh_cidrs("ssh_cidrs", ssh_cidrs) if ssh_cidrs else (config.ssh_cidrs or ())
    extra = watchdog.cloud_config(config.username, config.remote_dir, config.shutdown_command,
                                  autostop=autostop, lifetime=lifetime, down=config.autostop_down,
                                  spot=config.spot)
    keys = [node_host_key(host_key, rank) for rank in range(config.nnodes)]
    user_data = tuple(cloud_init_user_data(private, public, extra) for private, public in keys)
    public = keys[0][1]
    return InstanceSpec(
        server_name=server_name,
        instance_type=chosen_type,
        username=config.username,
        volume_size=config.VolumeSize,
        user_data=user_data[0],
        host_public_key=public,
        tags={**crimpl_tags(server_name, public, config.username, config.tags),
              **watchdog.tags(autostop, lifetime, config.autostop_down), NODE_RANK_TAG: "0",
              **({PLACEMENT_TAG: f"crimpl-{server_name}-{config.placement}"} if config.placement else {})},
        image_id=config.ImageId,
        key_name=config.KeyName,
        public_key=None if config.KeyName else public_key_of(config.KeyFile),
        subnet_id=config.SubnetId,
        security_group_id=config.SecurityGroupId,
        ssh_cidrs=cidrs,
        spot=config.spot,
        region=config.region,
        # What the watchdog's shutdown does; a job's on_complete sets it again for that job.
        shutdown_behavior="terminate" if config.autostop_down else "stop",
        nnodes=config.nnodes,
        placement=config.placement,
        node_user_data=user_data,
        node_host_keys=tuple(public for _, public in keys),
    )


# ---------------------------------------------------------------------------
# Stack configs (Pulumi.<stack>.yaml)

def stack_server_name(project: str, stack: str) -> str:
    """Return the server name of a stack: ``<project>-<stack>``."""
    return f"{project}-{stack}"


def config_from_stack(values: dict[str, Any], *, source: str = "stack config"
                      ) -> tuple[AWSEC2_Config, int | None, str | None]:
    """Return ``(AWSEC2_Config, nprocs, server_name)`` from a stack's ``crimpl:`` values.

    :param values: mapping of ``crimpl:`` keys (without the namespace) to values,
        plus ``region`` from ``aws:region`` when set.
    :param source: what to name in errors (usually the ``Pulumi.<stack>.yaml`` path).
    :raises ConfigError: naming the key and ``source`` for an unknown key or a wrong value.
    """
    for key in values:
        if key not in KEYS and key != "region":
            raise ConfigError(
                f"{source}: unknown key crimpl:{key}; known keys: {', '.join(sorted(KEYS))}"
            )
    # The stack-only keys; the others are checked as AWSEC2_Config fields below.
    for key, spec in KEYS.items():
        if spec.field is None and key in values:
            spec.validate(values[key], name=f"{source}: crimpl:{key}")
    saved = values.get("config")
    fields = AWSEC2_Config.load(saved).to_dict() if saved is not None else {}
    for key, spec in KEYS.items():
        if spec.field is not None and key in values:
            fields[spec.field] = values[key]
    if values.get("region") is not None:
        fields["region"] = values["region"]
    try:
        config = AWSEC2_Config(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {_stack_key_message(exc)}") from exc
    return config, values.get("nprocs"), values.get("serverName")


def _stack_key_message(exc: ConfigError) -> str:
    # Name the stack key (crimpl:keyFile) rather than the Python field (KeyFile) in stack errors.
    message = str(exc)
    for name, spec in FIELDS.items():
        if message.startswith(name + " ") or message.startswith(name + ":"):
            return f"{spec.namespace}:{spec.key}" + message[len(name):]
    return message
