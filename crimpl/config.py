"""Account-level settings (:class:`AWSEC2_Config`), saved configs, and the one instance spec.

Lookup order for every setting, in one place:

1. an argument given to the call (``AWSEC2.new(nprocs=..., server_name=...)``)
   or a ``crimpl:`` key of the stack's ``Pulumi.<stack>.yaml``;
2. the :class:`AWSEC2_Config` (given directly, by saved name, or the only saved one);
3. the default written in :data:`FIELDS`.

:func:`build_spec` turns these into one :class:`InstanceSpec`; both the boto3
launch path (``crimpl.ec2``) and the Pulumi program (``infra/``) render the
instance from it, so the two cannot drift.
"""

import ipaddress
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import pricing
from ._version import __version__
from .errors import ConfigError
from .home import crimpl_home, write_private_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_KEY_POLICIES = ("pinned", "accept-new")
DEFAULT_VOLUME_SIZE = 20
DEFAULT_SSH_TIMEOUT = 300.0

#: Every field of AWSEC2_Config: name -> (default, allowed types, one-line help).
FIELDS = {
    "KeyFile": (None, (str, os.PathLike), "path of the SSH private key used to log in"),
    "KeyName": (None, (str,), "existing EC2 key pair; unset: crimpl imports KeyFile's public key"),
    "SubnetId": (None, (str,), "subnet to launch in; unset: the default VPC's default subnet"),
    "SecurityGroupId": (None, (str,), "existing security group; unset: crimpl creates one for SSH"),
    "region": (None, (str,), "AWS region; unset: AWS_REGION / AWS_DEFAULT_REGION / profile"),
    "ImageId": (None, (str,), "AMI; unset: the newest Ubuntu LTS image of the region"),
    "username": ("ubuntu", (str,), "login user of the image"),
    "VolumeSize": (DEFAULT_VOLUME_SIZE, (int,), "root volume size in GiB"),
    "InstanceType": (None, (str,), "instance type; overrides nprocs"),
    "tags": (None, (dict,), "extra tags for everything crimpl creates"),
    "spot": (False, (bool,), "launch as a spot instance"),
    "ssh_cidrs": (None, (list, tuple), "CIDRs allowed to SSH; unset: the caller's address /32"),
    "ssh_config": (None, (str, os.PathLike), "OpenSSH config file to route SSH through"),
    "host_key_policy": ("pinned", (str,), "'pinned' (key from user data) or 'accept-new'"),
    "use_private_ip": (False, (bool,), "connect to the private IP (e.g. through a bastion)"),
    "ssh_timeout": (DEFAULT_SSH_TIMEOUT, (int, float), "seconds to wait for SSH after a start"),
    "shutdown_command": ("sudo shutdown -h now", (str,), "what a job runs for on_complete"),
    "remote_dir": ("crimpl", (str,), "crimpl's folder on the server, relative to home"),
}


class AWSEC2_Config:  # noqa: N801 - the name is the public API users already know
    """Account-level settings for the EC2 servers crimpl launches.

    Field names and defaults are listed in :data:`FIELDS`. Construction validates
    every field and raises :class:`~crimpl.errors.ConfigError` naming the field.
    The object holds names and paths only; it never holds AWS credentials or key
    material, and neither does the file :meth:`save` writes.
    """

    def __init__(self, KeyFile=None, **kwargs):  # noqa: N803
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise ConfigError(
                f"AWSEC2_Config got unknown field(s) {', '.join(unknown)}; "
                f"known fields: {', '.join(FIELDS)}"
            )
        values = {name: default for name, (default, _, _) in FIELDS.items()}
        values.update(kwargs)
        values["KeyFile"] = KeyFile
        for name, value in values.items():
            setattr(self, name, _validate(name, value))

    def to_dict(self):
        """Return the fields that differ from their defaults, as plain JSON values."""
        out = {}
        for name, (default, _, _) in FIELDS.items():
            value = getattr(self, name)
            if value != default:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def __eq__(self, other):
        return isinstance(other, AWSEC2_Config) and self.to_dict() == other.to_dict()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"AWSEC2_Config({args})"

    def save(self, name):
        """Save this config as ``name`` in ``$CRIMPL_HOME/configs`` (mode 0600).

        :returns: the path written.
        """
        _check_name(name, "config name")
        path = _configs_dir() / f"{name}.json"
        write_private_file(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, name=None):
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


def saved_config_names():
    """Return the names of the saved configs, sorted."""
    return sorted(p.stem for p in _configs_dir().glob("*.json"))


def resolve_config(config=None):
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
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def is_valid_name(name):
    """Return True if ``name`` may name a config, a server or a job."""
    return isinstance(name, str) and bool(_NAME.match(name))


def _check_name(name, what):
    if not is_valid_name(name):
        raise ConfigError(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )


def _validate(name, value):
    default, types, _ = FIELDS[name]
    if name == "KeyFile":
        return _validate_key_file(value)
    if value is None:
        return default
    # bool is an int: do not let True pass as a VolumeSize.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{name} must be a {wanted}, got {type(value).__name__} {value!r}")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{name} is empty: give a value or leave it out")
    if name == "VolumeSize" and not 8 <= value <= 16384:
        raise ConfigError(f"VolumeSize must be between 8 and 16384 GiB, got {value}")
    if name == "ImageId" and not value.startswith("ami-"):
        raise ConfigError(f"ImageId must look like ami-..., got {value!r}")
    if name == "host_key_policy" and value not in HOST_KEY_POLICIES:
        raise ConfigError(f"host_key_policy must be one of {', '.join(HOST_KEY_POLICIES)}, got {value!r}")
    if name == "ssh_timeout" and value <= 0:
        raise ConfigError(f"ssh_timeout must be a positive number of seconds, got {value}")
    if name == "tags":
        return _validate_tags(value)
    if name == "ssh_cidrs":
        return tuple(_validate_cidr(c) for c in value)
    if name == "ssh_config":
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"ssh_config: {path} does not exist; give the path of an OpenSSH config file")
        return str(path)
    return value


def _validate_key_file(value):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError("KeyFile is required: the path of the SSH private key for the server")
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"KeyFile must be a path, got {type(value).__name__}")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"KeyFile: {path} does not exist; create it with ssh-keygen -t ed25519 -f {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"KeyFile: {path} is readable by others (mode {mode:04o}); run chmod 600 {path}"
        )
    return str(path)


def _validate_tags(tags):
    out = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"tags must map strings to strings, got {key!r}: {value!r}")
        if key.startswith(("crimpl:", "aws:")):
            raise ConfigError(f"tag {key!r} is reserved: crimpl: and aws: tags are set by crimpl and AWS")
        out[key] = str(value)
    return out


def _validate_cidr(cidr):
    try:
        network = ipaddress.ip_network(str(cidr), strict=False)
    except ValueError as exc:
        raise ConfigError(f"ssh_cidrs: {cidr!r} is not a CIDR such as 203.0.113.7/32") from exc
    if network.prefixlen == 0:
        raise ConfigError(
            f"ssh_cidrs: {cidr} would open SSH to the whole internet; list your own networks instead"
        )
    return str(network)


def public_key_of(key_file):
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


@dataclass(frozen=True)
class InstanceSpec:
    """Everything that defines one crimpl instance, whichever provisioner creates it."""

    server_name: str
    instance_type: str
    username: str
    volume_size: int
    user_data: str
    host_public_key: str
    tags: dict = field(hash=False)
    image_id: str = None  # None: the newest Ubuntu LTS image, looked up at launch
    key_name: str = None  # None: import public_key as key_pair_name
    public_key: str = None
    subnet_id: str = None
    security_group_id: str = None  # None: create security_group_name for ssh_cidrs
    ssh_cidrs: tuple = ()  # empty: the caller's address /32, found at launch
    spot: bool = False
    region: str = None
    shutdown_behavior: str = "stop"

    @property
    def key_pair_name(self):
        """Name of the key pair crimpl imports when no ``KeyName`` is given."""
        return self.key_name or f"crimpl-{self.server_name}"

    @property
    def security_group_name(self):
        """Name of the SSH security group crimpl creates when none is given."""
        return f"crimpl-{self.server_name}-ssh"


#: Canonical's AWS account, which publishes the official Ubuntu images.
UBUNTU_OWNER = "099720109477"
#: Name pattern of Canonical's amd64 server images on EBS (gp2 and gp3 variants).
UBUNTU_NAME_PATTERN = "ubuntu/images/hvm-ssd*/ubuntu-*-amd64-server-*"


def generate_server_name():
    """Return a readable, unique-enough server name such as ``crimpl-7f3a2c``."""
    return f"crimpl-{secrets.token_hex(3)}"


def crimpl_tags(server_name, host_public_key, username, extra=None):
    """Return the tags every crimpl instance carries (user tags first, crimpl's win)."""
    tags = dict(extra or {})
    tags.update({
        "Name": server_name,
        "crimpl:managed": "true",
        "crimpl:name": server_name,
        "crimpl:version": __version__,
        "crimpl:user": username,
        "crimpl:host-key": host_public_key,
    })
    return tags


def build_spec(config, *, nprocs=None, server_name=None, host_key=None, instance_type=None,
               ssh_cidrs=None):
    """Return the :class:`InstanceSpec` for ``config`` and the per-server arguments.

    :param config: an :class:`AWSEC2_Config`.
    :param nprocs: processors wanted; picks the cheapest type (``InstanceType`` wins).
    :param server_name: unique name of the server; generated when None.
    :param host_key: ``(private_pem, public_line)``; a new key is generated when None.
    :param instance_type: explicit type, overriding both ``nprocs`` and ``config.InstanceType``.
    :param ssh_cidrs: CIDRs allowed to SSH, overriding ``config.ssh_cidrs``.
    """
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
    private, public = host_key or generate_host_key()
    cidrs = tuple(_validate_cidr(c) for c in ssh_cidrs) if ssh_cidrs else (config.ssh_cidrs or ())
    return InstanceSpec(
        server_name=server_name,
        instance_type=chosen_type,
        username=config.username,
        volume_size=config.VolumeSize,
        user_data=cloud_init_user_data(private, public),
        host_public_key=public,
        tags=crimpl_tags(server_name, public, config.username, config.tags),
        image_id=config.ImageId,
        key_name=config.KeyName,
        public_key=None if config.KeyName else public_key_of(config.KeyFile),
        subnet_id=config.SubnetId,
        security_group_id=config.SecurityGroupId,
        ssh_cidrs=cidrs,
        spot=config.spot,
        region=config.region,
    )


# ---------------------------------------------------------------------------
# Stack configs (Pulumi.<stack>.yaml)

#: crimpl: stack keys (camelCase, as Pulumi configs are) -> AWSEC2_Config field.
STACK_KEYS = {
    "keyFile": "KeyFile",
    "keyName": "KeyName",
    "subnetId": "SubnetId",
    "securityGroupId": "SecurityGroupId",
    "imageId": "ImageId",
    "username": "username",
    "volumeSize": "VolumeSize",
    "instanceType": "InstanceType",
    "tags": "tags",
    "spot": "spot",
    "sshCidrs": "ssh_cidrs",
    "sshConfig": "ssh_config",
    "hostKeyPolicy": "host_key_policy",
    "usePrivateIp": "use_private_ip",
    "sshTimeout": "ssh_timeout",
    "shutdownCommand": "shutdown_command",
    "remoteDir": "remote_dir",
}
#: crimpl: stack keys that are not AWSEC2_Config fields.
STACK_EXTRA_KEYS = {
    "nprocs": "processors wanted (picks the cheapest instance type)",
    "config": "name of a saved crimpl config to take account-level fields from",
    "serverName": "server name (default: <project>-<stack>)",
    "hostKey": "the instance's host private key (secret, set by crimpl at up)",
}


def stack_server_name(project, stack):
    """Return the server name of a stack: ``<project>-<stack>``."""
    return f"{project}-{stack}"


def config_from_stack(values, *, source="stack config"):
    """Return ``(AWSEC2_Config, nprocs, server_name)`` from a stack's ``crimpl:`` values.

    :param values: mapping of ``crimpl:`` keys (without the namespace) to values,
        plus ``region`` from ``aws:region`` when set.
    :param source: what to name in errors (usually the ``Pulumi.<stack>.yaml`` path).
    :raises ConfigError: naming the key and ``source`` for an unknown key or a wrong type.
    """
    known = set(STACK_KEYS) | set(STACK_EXTRA_KEYS) | {"region"}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key crimpl:{key}; known keys: {', '.join(sorted(known - {'region'}))}"
            )
    saved = values.get("config")
    base = AWSEC2_Config.load(saved).to_dict() if saved is not None else {}
    fields = dict(base)
    for key, field_name in STACK_KEYS.items():
        if key in values:
            fields[field_name] = values[key]
    if values.get("region") is not None:
        fields["region"] = values["region"]
    nprocs = values.get("nprocs")
    if nprocs is not None and (isinstance(nprocs, bool) or not isinstance(nprocs, int)):
        raise ConfigError(f"{source}: crimpl:nprocs must be a whole number, got {nprocs!r}")
    try:
        config = AWSEC2_Config(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {_stack_key_message(exc)}") from exc
    return config, nprocs, values.get("serverName")


def _stack_key_message(exc):
    # Name the stack key (keyFile) rather than the Python field (KeyFile) in stack errors.
    message = str(exc)
    for key, field_name in STACK_KEYS.items():
        if message.startswith(field_name):
            return f"crimpl:{key}" + message[len(field_name):]
    return message
