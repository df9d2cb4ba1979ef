"""crimpl's Pulumi program: one EC2 server for this stack, of one node or several (``crimpl:nodes``).

Stack config (``crimpl:`` keys, see Pulumi.example.yaml) -> the one instance spec
of :func:`crimpl.config.build_spec`, shared with the boto3 path -> resources ->
exports. Every resource mirrors :mod:`crimpl.ec2` (``run_instances_params`` per node,
``ensure_key_pair``, ``ensure_security_group`` with ``self_permission``,
``placement_group_params``); tests/test_infra.py checks that.
"""

import re

import pulumi
import pulumi_aws as aws

from crimpl.config import (
    HOST_KEY_TAG,
    NODE_RANK_TAG,
    UBUNTU_NAME_PATTERN,
    UBUNTU_OWNER,
    build_spec,
    config_from_stack,
    stack_server_name,
)
from crimpl.errors import ConfigError
from crimpl import hostkeys, watchdog
from crimpl.hostkeys import public_line_of
from crimpl.stackkeys import kind_of

# --- Config ------------------------------------------------------------------

config = pulumi.Config("crimpl")
stack = pulumi.get_stack()
source = f"Pulumi.{stack}.yaml"

# Every crimpl: key that is set, unknown ones included, so that a typo is an
# error rather than silently ignored. pulumi.Config cannot list keys; the
# runtime's config map can.
set_keys = {**pulumi.runtime.get_config_env(), **pulumi.runtime.config.CONFIG.get()}
getters = {int: config.get_int, bool: config.get_bool, float: config.get_float,
           object: config.get_object, str: config.get}
try:
    values = {key: getters[kind_of(key)](key)
              for key in (k.split(":", 1)[1] for k in set_keys if k.startswith("crimpl:"))}
except pulumi.ConfigTypeError as exc:
    raise pulumi.RunError(f"{source}: {exc}") from exc
region = pulumi.Config("aws").get("region")
if region:
    values["region"] = region

host_private = values.get("hostKey")
if not host_private:
    raise pulumi.RunError(
        f"{source}: crimpl:hostKey is not set: crimpl up generates it; with the pulumi CLI, run "
        "ssh-keygen -q -t ed25519 -N '' -f hostkey && pulumi config set --secret crimpl:hostKey < hostkey"
    )
if not pulumi.runtime.is_config_secret("crimpl:hostKey"):
    raise pulumi.RunError(f"{source}: crimpl:hostKey must be a secret: set it with pulumi config set --secret")

try:
    crimpl_config, nprocs, server_name = config_from_stack(values, source=source)
    try:
        host_key = (host_private, public_line_of(host_private))
    except ValueError as exc:
        raise ConfigError(f"{source}: crimpl:hostKey is not an unencrypted OpenSSH private key ({exc})") from exc
    spec = build_spec(
        crimpl_config,
        nprocs=nprocs,
        server_name=server_name or stack_server_name(pulumi.get_project(), stack),
        host_key=host_key,
        ssh_cidrs=values.get("sshCidrs"),
    )
except ConfigError as exc:
    raise pulumi.RunError(str(exc)) from exc

if not spec.security_group_id and not spec.ssh_cidrs:
    raise pulumi.RunError(
        f"{source}: crimpl:sshCidrs is not set: crimpl up fills in your address; with the pulumi CLI, "
        "run pulumi config set --path 'crimpl:sshCidrs[0]' <your address>/32"
    )

# Everything crimpl creates carries the instances' tags except a node's own host key and rank.
resource_tags = {k: v for k, v in spec.tags.items() if k not in (HOST_KEY_TAG, NODE_RANK_TAG)}

# --- Image -------------------------------------------------------------------
# As crimpl.ec2.newest_ubuntu_lts: Canonical's amd64 server images, LTS releases
# only (YY.04, even YY), the newest release, then its newest build. most_recent
# alone would pick whichever release was rebuilt last.

image_filters = [
    {"name": "name", "values": [UBUNTU_NAME_PATTERN]},
    {"name": "architecture", "values": ["x86_64"]},
    {"name": "state", "values": ["available"]},
]


def lts_regex(year="[0-9][02468]"):
    return rf"/ubuntu-[a-z]+-{year}\.04-amd64-server-"


def newest_ubuntu_lts():
    image = aws.ec2.get_ami(owners=[UBUNTU_OWNER], most_recent=True, name_regex=lts_regex(),
                            filters=image_filters)
    year = int(re.search(r"-([0-9]+)\.04-amd64-server-", image.name).group(1))
    newest = year
    while aws.ec2.get_ami_ids(owners=[UBUNTU_OWNER], name_regex=lts_regex(newest + 2),
                              filters=image_filters).ids:
        newest += 2
    if newest != year:
        image = aws.ec2.get_ami(owners=[UBUNTU_OWNER], most_recent=True, name_regex=lts_regex(newest),
                                filters=image_filters)
    return image.id


image_id = spec.image_id or newest_ubuntu_lts()

# --- Key pair ----------------------------------------------------------------

if spec.key_name:
    key_name = spec.key_name
else:
    key_pair = aws.ec2.KeyPair(
        "key-pair",
        key_name=spec.key_pair_name,
        public_key=spec.public_key,
        tags=resource_tags,
        opts=pulumi.ResourceOptions(delete_before_replace=True),  # the name is fixed
    )
    key_name = key_pair.key_name

# --- Security group: SSH from the owner's networks only, and the nodes to each other ---

if spec.security_group_id:
    security_group_id = spec.security_group_id
else:
    security_group = aws.ec2.SecurityGroup(
        "ssh",
        name=spec.security_group_name,
        description=f"crimpl: SSH to {spec.server_name} from the owner address only",
        vpc_id=aws.ec2.get_subnet(id=spec.subnet_id).vpc_id if spec.subnet_id else None,
        ingress=[{
            "protocol": "tcp",
            "from_port": 22,
            "to_port": 22,
            # As crimpl.ec2.ssh_permission: an IPv6 network belongs in the IPv6 field of the rule.
            "cidr_blocks": [c for c in spec.ssh_cidrs if ":" not in c],
            "ipv6_cidr_blocks": [c for c in spec.ssh_cidrs if ":" in c],
            "description": "crimpl: SSH from the owner",
        }, {
            # As crimpl.ec2.self_permission: everything, but only from members of this group (the nodes).
            "protocol": "-1",
            "from_port": 0,
            "to_port": 0,
            "self": True,
            "description": "crimpl: between the nodes of the server",
        }],
        # What AWS gives a new group; Pulumi would otherwise remove it.
        egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"]}],
        tags=resource_tags,
    )
    security_group_id = security_group.id

# --- Placement group (crimpl:placement) ----------------------------------------

placement_group = aws.ec2.PlacementGroup(
    "placement",
    name=spec.placement_group_name,
    strategy=spec.placement,
    tags=resource_tags,
) if spec.placement else None

# --- Instances: one per node, rank 0 named "server" as before nodes existed ---------

instances = [aws.ec2.Instance(
    "server" if node.rank == 0 else f"server-{node.rank}",
    ami=image_id,
    instance_type=spec.instance_type,
    key_name=key_name,
    subnet_id=spec.subnet_id,
    vpc_security_group_ids=[security_group_id],
    user_data=pulumi.Output.secret(node.user_data),  # carries the node's host private key
    instance_initiated_shutdown_behavior=spec.shutdown_behavior,
    root_block_device={"volume_size": spec.volume_size, "volume_type": "gp3", "delete_on_termination": True},
    metadata_options={"http_tokens": "required", "http_endpoint": "enabled"},
    instance_market_options={
        "market_type": "spot",
        # Stoppable spot instances must be persistent and stop on interruption.
        "spot_options": {"instance_interruption_behavior": "stop", "spot_instance_type": "persistent"},
    } if spec.spot else None,
    placement_group=placement_group.name if placement_group else None,
    tags=node.tags,
    volume_tags=node.tags,
    # A looked-up image changes with every Canonical build; that must not replace the server.
    # crimpl replaces the user-data host key after the first connection and records the new
    # one in these tags (crimpl.hostkeys.rotate): `up` after a refresh must not put the old back.
    # `crimpl autostop` changes the watchdog on the server and records it in its tag, likewise.
    opts=pulumi.ResourceOptions(ignore_changes=([] if spec.image_id else ["ami"]) + [
        f'{prop}["{tag}"]' for prop in ("tags", "tagsAll")
        for tag in (hostkeys.HOST_KEY_TAG, hostkeys.ROTATED_TAG, watchdog.AUTOSTOP_TAG)
    ]),
) for node in spec.nodes]

# --- Exports -----------------------------------------------------------------

pulumi.export("instanceId", instances[0].id)
pulumi.export("publicIp", instances[0].public_ip)
pulumi.export("privateIp", instances[0].private_ip)
# Per node, rank 0 first.
pulumi.export("instanceIds", pulumi.Output.all(*(i.id for i in instances)))
pulumi.export("privateIps", pulumi.Output.all(*(i.private_ip for i in instances)))
pulumi.export("username", spec.username)
pulumi.export("serverName", spec.server_name)
