"""Every ``crimpl:`` stack key in one place: its type, default, check and help text.

A stack key (camelCase, as Pulumi configs are) usually sets one field of
:class:`~crimpl.config.AWSEC2_Config` (``crimpl:volumeSize`` -> ``VolumeSize``);
a few are stack-only (``nprocs``, ``config``, ``serverName``, ``hostKey``).
``aws:region`` sets the ``region`` field. The config (:mod:`crimpl.config`), the
stack reader (:mod:`crimpl.stack`) and the Pulumi program (``infra/``) all read
the keys from here, and ``Pulumi.example.yaml`` documents each of them.

Every check raises :class:`~crimpl.errors.ConfigError` with a one-line message
that starts with the name it was given (the field name for the Python API; the
stack reader renames it to ``crimpl:<key>``).

What ``sshCidrs`` may open: together, the networks may cover at most a /8 of
IPv4 (16,777,216 addresses) and a /32 of IPv6. More than that is refused, however
it is split (``0.0.0.0/1`` + ``128.0.0.0/1`` is the whole internet), because
SSH open to that many addresses is SSH open to the world.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .pricing import check_nprocs

HOST_KEY_POLICIES = ("pinned", "accept-new")
DEFAULT_VOLUME_SIZE = 20
DEFAULT_SSH_TIMEOUT = 300.0
#: The most nodes one server may have: a guard against a typo launching hundreds of instances.
MAX_NODES = 64
#: What ``placement`` may be: a cluster placement group (the nodes close together).
PLACEMENTS = ("cluster",)
#: The largest union of networks ``sshCidrs`` may open SSH to, per IP version, as a prefix length.
MIN_SSH_PREFIX = {4: 8, 6: 32}


@dataclass(frozen=True)
class StackKey:
    """One setting: its stack key, the config field it sets, its type, default, check and help.

    :param key: the key without its namespace (``volumeSize`` of ``crimpl:volumeSize``).
    :param help: one line for ``Pulumi.example.yaml`` and error messages.
    :param types: the Python types a value may have.
    :param default: the value when the key is not set.
    :param field: the :class:`~crimpl.config.AWSEC2_Config` field it sets; None: stack-only.
    :param check: ``check(name, value) -> value`` validates a value of the right type
        (and may normalise it); None: any value of the right type.
    :param namespace: ``crimpl`` for crimpl's keys; ``aws`` for ``aws:region``.
    :param required: a value must be given (there is no default).
    """

    key: str
    help: str
    types: tuple[type, ...] = (str,)
    default: Any = None
    field: str | None = None
    check: Callable[[str, Any], Any] | None = None
    namespace: str = "crimpl"
    required: bool = False

    @property
    def kind(self) -> type:
        """What the key holds in a stack: ``int``, ``bool``, ``float``, ``str`` or ``object``
        (a YAML/JSON list or mapping). Pulumi hands the program every value as a string;
        this says how to parse it.
        """
        for kind in (bool, float, int):
            if kind in self.types:
                return kind
        if dict in self.types or list in self.types:
            return object
        return str

    def validate(self, value: Any, name: str | None = None) -> Any:
        """Return ``value`` checked (and normalised), or the default for None.

        :param name: the name errors start with (default: the field, else the key).
        :raises ConfigError: naming ``name``, for a value of the wrong type or one the check refuses.
        """
        name = name or self.field or self.key
        if value is None:
            if self.required:
                raise ConfigError(f"{name} is required: the {self.help}")
            return self.default
        # bool is an int: do not let True pass as a VolumeSize.
        if not isinstance(value, self.types) or (isinstance(value, bool) and bool not in self.types):
            wanted = " or ".join(t.__name__ for t in self.types)
            raise ConfigError(f"{name} must be a {wanted}, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value.strip():
            raise ConfigError(f"{name} is empty: give a value or leave it out")
        return self.check(name, value) if self.check else value


# ---------------------------------------------------------------------------
# Checks: each takes the name to report and a value of the right type


def _key_file(name, value):
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: {path} does not exist; create it with ssh-keygen -t ed25519 -f {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{name}: {path} is readable by others (mode {mode:04o}); run chmod 600 {path}")
    return str(path)


def _volume_size(name, value):
    if not 8 <= value <= 16384:
        raise ConfigError(f"{name} must be between 8 and 16384 GiB, got {value}")
    return value


def _nodes(name, value):
    if not 1 <= value <= MAX_NODES:
        raise ConfigError(f"{name} must be a whole number of nodes from 1 to {MAX_NODES}, got {value}")
    return value


def _placement(name, value):
    if value not in PLACEMENTS:
        raise ConfigError(f"{name} must be cluster (a cluster placement group) or left out, got {value!r}")
    return value


def _positive_seconds(name, value):
    # nan compares False with everything, so `value <= 0` alone lets it through; inf never ends a wait.
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive, finite number of seconds, got {value}")
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def parse_duration(name: str, value: object) -> int:
    """Return the seconds of a duration such as ``90s``, ``30m``, ``12h`` or ``2d``.

    :param name: what errors name (``autostop``, ``crimpl:maxLifetime``).
    :raises ConfigError: for anything else: no unit, zero, negative or not a number.
    """
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{name} must be a duration such as 30m, 12h or 2d (s, m, h, d), got {value!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{name} must be longer than 0, got {value!r}: use off to switch it off")
    return seconds


def _duration(name, value):
    """The stack-key check of a duration: return ``value`` without spaces once it parses."""
    parse_duration(name, value)
    return "".join(value.split())


def _image_id(name, value):
    if not value.startswith("ami-"):
        raise ConfigError(f"{name} must look like ami-..., got {value!r}")
    return value


def _host_key_policy(name, value):
    if value not in HOST_KEY_POLICIES:
        raise ConfigError(f"{name} must be one of {', '.join(HOST_KEY_POLICIES)}, got {value!r}")
    return value


def _tags(name, tags):
    out = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name} must map strings to strings, got {key!r}: {value!r}")
        if key.startswith(("crimpl:", "aws:")):
            raise ConfigError(
                f"{name}: tag {key!r} is reserved: crimpl: and aws: tags are set by crimpl and AWS"
            )
        out[key] = str(value)
    return out


def _ssh_config(name, value):
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name}: {path} does not exist; give the path of an OpenSSH config file")
    return str(path)


def _nprocs(name, value):
    try:
        check_nprocs(value)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("nprocs", name, 1)) from None
    return value


def check_ssh_cidrs(name: str, cidrs: Any) -> tuple[str, ...]:
    """Return ``cidrs`` as normalised network strings, duplicates dropped, order kept.

    :raises ConfigError: for a value that is not a network, or networks whose
        union is larger than a /8 of IPv4 or a /32 of IPv6 (the module docstring says why).
    """
    if isinstance(cidrs, (str, bytes)) or not isinstance(cidrs, (list, tuple)):
        raise ConfigError(f"{name} must be a list of networks such as 203.0.113.7/32, got {cidrs!r}")
    networks = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(str(cidr), strict=False)
        except ValueError:
            raise ConfigError(f"{name}: {cidr!r} is not a CIDR such as 203.0.113.7/32") from None
        if network not in networks:
            networks.append(network)
    for version, min_prefix in MIN_SSH_PREFIX.items():
        ours = [n for n in networks if n.version == version]
        union = list(ipaddress.collapse_addresses(ours))
        size = sum(n.num_addresses for n in union)
        if size == 0:
            continue
        whole = 2 ** (32 if version == 4 else 128)
        if size == whole:
            raise ConfigError(
                f"{name}: {', '.join(map(str, ours))} would open SSH to the whole internet; "
                "list your own networks instead"
            )
        if size > 2 ** ((32 if version == 4 else 128) - min_prefix):
            raise ConfigError(
                f"{name}: {', '.join(map(str, ours))} together cover {', '.join(map(str, union))}, "
                f"more than a /{min_prefix}: list only your own networks (at most a /{MIN_SSH_PREFIX[4]} "
                f"of IPv4 and a /{MIN_SSH_PREFIX[6]} of IPv6 in all)"
            )
    return tuple(str(n) for n in networks)


# ---------------------------------------------------------------------------
# The keys

_KEYS = [
    StackKey("keyFile", "path of the SSH private key used to log in", (str, os.PathLike),
             field="KeyFile", check=_key_file, required=True),
    StackKey("keyName", "existing EC2 key pair; unset: crimpl imports KeyFile's public key", field="KeyName"),
    StackKey("subnetId", "subnet to launch in; unset: the default VPC's default subnet", field="SubnetId"),
    StackKey("securityGroupId", "existing security group; unset: crimpl creates one for SSH",
             field="SecurityGroupId"),
    StackKey("region", "AWS region; unset: AWS_REGION / AWS_DEFAULT_REGION / profile", field="region",
             namespace="aws"),
    StackKey("imageId", "AMI; unset: the newest Ubuntu LTS image of the region", field="ImageId",
             check=_image_id),
    StackKey("username", "login user of the image", default="ubuntu", field="username"),
    StackKey("volumeSize", "root volume size in GiB", (int,), DEFAULT_VOLUME_SIZE, "VolumeSize",
             _volume_size),
    StackKey("instanceType", "instance type; overrides nprocs", field="InstanceType"),
    StackKey("nodes", f"instances of the server, ranks 0 to N-1, that run each job together (1-{MAX_NODES})",
             (int,), 1, "nnodes", _nodes),
    StackKey("placement", "'cluster': launch the nodes in a cluster placement group (close together); "
             "unset: none", field="placement", check=_placement),
    StackKey("tags", "extra tags for everything crimpl creates", (dict,), field="tags", check=_tags),
    StackKey("spot", "launch as a spot instance", (bool,), False, "spot"),
    StackKey("sshCidrs", "networks allowed to SSH, at most a /8 of IPv4 and a /32 of IPv6 in all; "
             "unset: the caller's address /32", (list, tuple),
             field="ssh_cidrs", check=check_ssh_cidrs),
    StackKey("sshConfig", "OpenSSH config file to route SSH through", (str, os.PathLike),
             field="ssh_config", check=_ssh_config),
    StackKey("hostKeyPolicy", "'pinned' (key from user data) or 'accept-new'", default="pinned",
             field="host_key_policy", check=_host_key_policy),
    StackKey("usePrivateIp", "connect to the private IP (e.g. through a bastion)", (bool,), False,
             "use_private_ip"),
    StackKey("sshTimeout", "seconds to wait for SSH after a start", (int, float), DEFAULT_SSH_TIMEOUT,
             "ssh_timeout", _positive_seconds),
    StackKey("autostop", "stop the server once it has been idle this long (30m, 2h; the watchdog on "
             "the server decides); unset: never", field="autostop", check=_duration),
    StackKey("autostopDown", "autostop and maxLifetime terminate the server instead of stopping it",
             (bool,), False, "autostop_down"),
    StackKey("maxLifetime", "stop the server this long after launch however busy it is (12h, 2d); "
             "unset: no limit", field="max_lifetime", check=_duration),
    StackKey("shutdownCommand", "what a job runs for on_complete", default="sudo shutdown -h now",
             field="shutdown_command"),
    StackKey("remoteDir", "crimpl's folder on the server, relative to home", default="crimpl",
             field="remote_dir"),
    StackKey("nprocs", "processors wanted (picks the cheapest instance type)", (int,), check=_nprocs),
    StackKey("config", "name of a saved crimpl config to take account-level fields from"),
    StackKey("serverName", "server name (default: <project>-<stack>)"),
    StackKey("hostKey", "the instance's host private key (secret, set by crimpl at up)"),
]

#: Every ``crimpl:`` stack key, by key.
KEYS: dict[str, StackKey] = {k.key: k for k in _KEYS if k.namespace == "crimpl"}
#: Every :class:`~crimpl.config.AWSEC2_Config` field (``region`` included), by field name.
FIELDS: dict[str, StackKey] = {k.field: k for k in _KEYS if k.field}


def kind_of(key: str) -> type:
    """Return what the ``crimpl:`` key ``key`` holds (see :attr:`StackKey.kind`); ``str`` if unknown."""
    found = KEYS.get(key)
    return found.kind if found else str


def coerce(key: str, value: Any, source: str = "stack config") -> Any:
    """Return a stack value with the type of its key, parsing strings as Pulumi does.

    YAML gives ints, bools and mappings natively; a quoted value (or a value set
    with ``pulumi config set``) is a string and is parsed like ``pulumi.Config``'s
    ``get_int`` / ``get_bool`` / ``get_float`` / ``get_object``. Anything else is
    returned unchanged, for the key's check to judge.

    :raises ConfigError: naming the key and ``source`` if a string does not parse.
    """
    kind = kind_of(key)
    if not isinstance(value, str) or kind is str:
        return value
    try:
        if kind is bool:
            if value not in ("true", "True", "false", "False"):
                raise ValueError(value)
            return value in ("true", "True")
        if kind is object:
            return json.loads(value)
        return kind(value)
    except ValueError as exc:
        wanted = {int: "a whole number", bool: "true or false", float: "a number",
                  object: "a YAML list or mapping"}[kind]
        raise ConfigError(f"{source}: crimpl:{key} must be {wanted}, got {value!r}") from exc
