"""EC2 through boto3 only: launch from a spec, find by tags, state, start/stop/terminate, waits.

Nothing here creates a client at import time. boto3's standard configuration
applies: the credential chain, ``AWS_PROFILE``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_EC2``.
Every botocore error is turned into a :class:`~crimpl.errors.CrimplError` here,
in :func:`api_errors`, with a message that says what to do.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import math
import os
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any

from .config import HOST_KEY_TAG, NODE_RANK_TAG, PLACEMENT_TAG, UBUNTU_NAME_PATTERN, UBUNTU_OWNER, InstanceSpec
from .errors import AWSError, ConfigError, InstanceNotFoundError, InstanceStateError
from .log import warn

MANAGED_TAG = "crimpl:managed"
NAME_TAG = "crimpl:name"
#: Every state but terminated: what still exists (and may bill).
ALIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
#: The states of a server that is there to stay (shutting-down is on its way out).
LIVE_STATES = ("pending", "running", "stopping", "stopped")
#: Poll every 1.5 s: boto3's own waiters poll every 15 s, far too slow for an interactive tool.
POLL_INTERVAL = 1.5
DEFAULT_TIMEOUT = 600.0
#: How many client tokens one launch tries before giving up (see :func:`launch_nodes`).
TOKEN_ATTEMPTS = 8
#: Seconds to wait for the instance of another `up` that holds our client token to be listed.
TOKEN_WAIT = 15.0


def client(region: str | None = None) -> Any:
    """Return an EC2 client from boto3's standard configuration, cached.

    The client is made once per region and per value of the ``AWS_*``
    environment variables (credentials, profile, endpoint, retries), which is
    everything boto3 reads from the environment: a changed variable gets a new
    client, an unchanged one reuses the session (creating one costs ~0.4 s).

    :param region: region name; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile's.
    :raises AWSError: if no region is configured anywhere or the profile is unknown.
    """
    # boto3 reads only AWS_DEFAULT_REGION; AWS_REGION (what the other SDKs and our messages use) wins.
    region = region or os.environ.get("AWS_REGION") or None
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _cached_client(region, aws_env)


@functools.lru_cache(maxsize=16)
def _cached_client(region, aws_env):
    """Make the client of :func:`client`; ``aws_env`` is only the cache key (boto3 reads os.environ)."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.session.Session(region_name=region)
        if not session.region_name:
            raise AWSError(
                "no AWS region set: export AWS_REGION=us-east-1 (or set region in the crimpl config)"
            )
        return session.client("ec2")
    except botocore.exceptions.ProfileNotFound as exc:
        raise AWSError(f"{exc}: fix AWS_PROFILE or run `aws configure --profile NAME`") from exc


def error_code(exc: BaseException) -> str:
    """Return the EC2 error code of a botocore ``ClientError`` ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code", "")


@contextlib.contextmanager
def api_errors(instance_id: str | None = None) -> Iterator[None]:
    """Turn botocore errors raised inside the block into crimpl errors."""
    import botocore.exceptions as bx

    try:
        yield
    except bx.NoCredentialsError as exc:
        raise AWSError(
            "no AWS credentials found: run `aws configure`, set AWS_PROFILE, "
            "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from exc
    except bx.EndpointConnectionError as exc:
        raise AWSError(
            f"cannot reach EC2 at {exc.kwargs.get('endpoint_url')}: check the region name "
            "and AWS_ENDPOINT_URL, and your network"
        ) from exc
    except bx.ClientError as exc:
        error = exc.response.get("Error", {})
        code, message = error.get("Code", ""), error.get("Message", "")
        if code.startswith("InvalidInstanceID"):
            raise InstanceNotFoundError(
                f"no EC2 instance {instance_id or ''} in this account and region: "
                "check the id and AWS_REGION (`crimpl list` shows crimpl's instances)",
                instance_id,
            ) from exc
        if code in ("AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId",
                    "SignatureDoesNotMatch", "ExpiredToken", "RequestExpired"):
            raise AWSError(f"AWS rejected the credentials ({code}): refresh them or check AWS_PROFILE") from exc
        if code in ("UnauthorizedOperation", "AccessDenied"):
            raise AWSError(f"not allowed by IAM ({code}): {message.splitlines()[0] if message else ''} "
                           "- grant the EC2 permissions listed in the README") from exc
        if code == "IncorrectInstanceState":
            raise InstanceStateError(f"{message}; check `crimpl status`", instance_id) from exc
        raise AWSError(f"EC2 refused the request ({code}): {message}") from exc
    except bx.BotoCoreError as exc:
        raise AWSError(f"EC2 request failed: {exc}") from exc


# ---------------------------------------------------------------------------
# Images

_UBUNTU_VERSION = re.compile(r"ubuntu-[a-z]+-(\d+)\.(\d+)-amd64-server-")


def is_lts(name: str) -> bool:
    """Return True if ``name`` is an Ubuntu LTS server image name (YY.04 with an even YY)."""
    match = _UBUNTU_VERSION.search(name)
    return bool(match) and match.group(2) == "04" and int(match.group(1)) % 2 == 0


def newest_ubuntu_lts(ec2: Any) -> str:
    """Return the image id of the current Ubuntu LTS (newest release, then newest build).

    Only Canonical's own amd64 server images count, so a look-alike image from
    another account is never picked.
    """
    with api_errors():
        images = ec2.describe_images(
            Owners=[UBUNTU_OWNER],
            Filters=[
                {"Name": "name", "Values": [UBUNTU_NAME_PATTERN]},
                {"Name": "architecture", "Values": ["x86_64"]},
                {"Name": "state", "Values": ["available"]},
            ],
        )["Images"]
    return newest_lts_image(images)


def newest_lts_image(images: Iterable[dict]) -> str:
    """Return the ``ImageId`` of the newest Ubuntu LTS release, then its newest build, among
    ``images`` (as EC2's DescribeImages gives them: ``ImageId``, ``Name``, ``CreationDate``).

    :raises AWSError: if none is an LTS release.
    """
    lts = [img for img in images if is_lts(img["Name"])]
    if not lts:
        raise AWSError("no Ubuntu LTS image found in this region: pass ImageId=ami-... in the config")

    def release_then_date(img):
        match = _UBUNTU_VERSION.search(img["Name"])
        return (int(match.group(1)), int(match.group(2)), img["CreationDate"])

    return max(lts, key=release_then_date)["ImageId"]


# ---------------------------------------------------------------------------
# Finding instances


def _tag_filters(name=None):
    filters = [{"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    if name is not None:
        filters.append({"Name": f"tag:{NAME_TAG}", "Values": [name]})
    return filters


def find_instances(ec2: Any, name: str | None = None, include_terminated: bool = False,
                   states: Iterable[str] | None = None) -> list[dict]:
    """Return crimpl-managed instances (dicts as EC2 describes them), oldest launch first.

    Ties on launch time (EC2 reports whole seconds) go to the lower instance id,
    so every caller sees the same order; the first of a name is its server.

    :param name: only the instance(s) with this ``crimpl:name`` tag.
    :param include_terminated: also return terminated instances.
    :param states: only instances in these states (wins over ``include_terminated``).
    """
    filters = _tag_filters(name)
    if states is None and not include_terminated:
        states = ALIVE_STATES
    if states is not None:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    instances = []
    with api_errors():
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                instances.extend(reservation["Instances"])
    return sorted(instances, key=_launch_order)


def _launch_order(instance):
    return instance["LaunchTime"], instance["InstanceId"]


def rank_of(instance: dict) -> int:
    """Return an instance's node rank (its ``crimpl:node-rank`` tag); 0 without one.

    Instances launched before crimpl had nodes carry no rank tag: each was the one node of its server.
    """
    value = tags_of(instance).get(NODE_RANK_TAG, "0")
    return int(value) if value.isdigit() else 0


def find_nodes(ec2: Any, name: str) -> list[dict]:
    """Return the live nodes of the server ``name``, one per rank, sorted by rank.

    A rank held by several instances (two `up` at the same moment, before
    :func:`settle` ended the extra one) is its first launched, as :func:`settle` keeps it.
    """
    nodes = {}
    for instance in find_instances(ec2, name, states=LIVE_STATES):
        nodes.setdefault(rank_of(instance), instance)
    return [nodes[rank] for rank in sorted(nodes)]


def describe(ec2: Any, instance_id: str) -> dict:
    """Return the EC2 description of ``instance_id``.

    :raises InstanceNotFoundError: if there is no such instance.
    """
    if not isinstance(instance_id, str) or not instance_id.startswith("i-"):
        raise InstanceNotFoundError(
            f"{instance_id!r} is not an instance id (they look like i-0123456789abcdef0)", instance_id
        )
    with api_errors(instance_id):
        reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    if not reservations or not reservations[0]["Instances"]:
        raise InstanceNotFoundError(f"no EC2 instance {instance_id} in this account and region", instance_id)
    return reservations[0]["Instances"][0]


def tags_of(instance: dict) -> dict[str, str]:
    """Return an instance's tags as a dict."""
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def state_of(instance: dict) -> str:
    """Return an instance's state name (``running``, ``stopped``, ...)."""
    return instance["State"]["Name"]


def set_shutdown_behavior(ec2: Any, instance_id: str, behavior: str) -> None:
    """Set what a shutdown from inside the instance does: ``stop`` or ``terminate``."""
    with api_errors(instance_id):
        # The Attribute/Value form: EC2 accepts it for this attribute, and so does moto_server,
        # which ignores the InstanceInitiatedShutdownBehavior={"Value": ...} form.
        ec2.modify_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior", Value=behavior
        )


def set_tags(ec2: Any, instance_id: str, tags: dict[str, str]) -> None:
    """Add or overwrite tags of an instance (``{key: value}``)."""
    with api_errors(instance_id):
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": k, "Value": v} for k, v in tags.items()])


# ---------------------------------------------------------------------------
# Launching from a spec


def run_instances_params(spec: InstanceSpec, image_id: str, key_name: str,
                         security_group_ids: Iterable[str] | None) -> dict[str, Any]:
    """Render an :class:`~crimpl.config.InstanceSpec` as the parameters of ``RunInstances``.

    This is the boto3 rendering of the spec; ``infra/__main__.py`` is the Pulumi
    one, and the parity test compares the two.
    """
    params = {
        "ImageId": image_id,
        "InstanceType": spec.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": key_name,
        "UserData": spec.user_data,
        "InstanceInitiatedShutdownBehavior": spec.shutdown_behavior,
        "BlockDeviceMappings": [{
            "DeviceName": "/dev/sda1",
            "Ebs": {"VolumeSize": spec.volume_size, "VolumeType": "gp3", "DeleteOnTermination": True},
        }],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "TagSpecifications": [
            {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in spec.tags.items()]}
            for kind in ("instance", "volume")
        ],
    }
    if spec.subnet_id:
        params["SubnetId"] = spec.subnet_id
    if spec.placement_group_name:
        params["Placement"] = {"GroupName": spec.placement_group_name}
    if security_group_ids:
        params["SecurityGroupIds"] = list(security_group_ids)
    if spec.spot:
        # A spot instance that can be stopped must be persistent and stop, not terminate, on interruption.
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
        }
    return params


def key_fingerprints(public_line: str) -> set[str]:
    """Return the fingerprints EC2 may report for ``public_line`` once imported.

    EC2 reports the MD5 of the DER public key for an imported RSA key, and the
    base64 SHA-256 of the OpenSSH key blob (as ``ssh-keygen -l`` shows it) for
    an ed25519 key; moto_server reports the SHA-256 of the DER key, hex, for ed25519.

    :raises ConfigError: if ``public_line`` is not an OpenSSH public key.
    """
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_public_key(public_line.encode())
        blob = base64.b64decode(public_line.split()[1])
    except (ValueError, IndexError, TypeError) as exc:
        raise ConfigError(
            f"KeyFile: its public key {public_line[:40]!r}... is not an OpenSSH public key"
        ) from exc
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    sha = base64.b64encode(hashlib.sha256(blob).digest()).decode()
    return {
        _colons(hashlib.md5(der, usedforsecurity=False).digest()),
        sha, sha.rstrip("="),
        _colons(hashlib.sha256(der).digest()),
    }


def _colons(digest):
    return ":".join(f"{b:02x}" for b in digest)


def ensure_key_pair(ec2: Any, spec: InstanceSpec) -> str:
    """Return the key pair name for ``spec``, importing its public key when it names none.

    An imported key pair is tagged with the server name so ``destroy`` can remove it.
    A key pair of that name that holds another key (the key file was rotated) is
    replaced when crimpl made it for this server and no live instance uses it;
    otherwise it is refused, never used.

    :raises ConfigError: if the existing key pair holds another key and cannot be replaced.
    """
    if spec.key_name:
        return spec.key_name
    import botocore.exceptions as bx

    name = spec.key_pair_name
    wanted = key_fingerprints(spec.public_key)
    with api_errors():
        # A few rounds: another `up` may import the same name between our look and our import.
        for _ in range(3):
            found = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
            if found and found[0].get("KeyFingerprint") in wanted:
                return name
            if found:
                _delete_stale_key_pair(ec2, spec, found[0])
            try:
                ec2.import_key_pair(
                    KeyName=name,
                    PublicKeyMaterial=spec.public_key.encode(),
                    TagSpecifications=[{"ResourceType": "key-pair", "Tags": _crimpl_only_tags(spec)}],
                )
                return name
            except bx.ClientError as exc:
                if error_code(exc) != "InvalidKeyPair.Duplicate":
                    raise
    raise AWSError(f"key pair {name} keeps changing while crimpl imports it: is another `crimpl up` "
                   "running with another key file? Run up again once it has finished")


def _delete_stale_key_pair(ec2, spec, pair):
    name = pair["KeyName"]
    advice = (f"delete it (aws ec2 delete-key-pair --key-name {name}) or set KeyName (crimpl:keyName) "
              "to a key pair of your key file")
    if not _is_ours(pair.get("Tags", []), spec.server_name):
        raise ConfigError(f"key pair {name} exists in EC2 with another key than KeyFile and crimpl did not "
                          f"create it: {advice}")
    users = ec2.describe_instances(Filters=[{"Name": "key-name", "Values": [name]},
                                            {"Name": "instance-state-name", "Values": list(ALIVE_STATES)}])
    user_ids = [i["InstanceId"] for r in users["Reservations"] for i in r["Instances"]]
    if user_ids:
        raise ConfigError(f"key pair {name} holds another key than KeyFile and {', '.join(user_ids)} still "
                          f"uses it: log in with the old key, or end that server first; or {advice}")
    warn(f"key pair {name} held another key than KeyFile (rotated?): replacing it")
    ec2.delete_key_pair(KeyName=name)


def _is_ours(tags, server_name):
    tags = {t["Key"]: t["Value"] for t in tags}
    return tags.get(MANAGED_TAG) == "true" and tags.get(NAME_TAG) == server_name


def ensure_security_group(ec2: Any, spec: InstanceSpec, cidrs: Iterable[str]) -> str:
    """Return the security group id for ``spec``: the named one, or crimpl's SSH-only group.

    crimpl's group lets in TCP 22 from ``cidrs`` and, from the members of the
    group itself (the server's nodes), everything (:func:`self_permission`);
    nothing else. A group of that name that already exists is checked before it
    is used: any other rule is refused; TCP 22 from other networks is removed
    when crimpl made the group for this server, and refused otherwise.

    :raises ConfigError: if an existing group of crimpl's name lets in more than that.
    """
    if spec.security_group_id:
        return spec.security_group_id
    import botocore.exceptions as bx

    cidrs = list(cidrs)
    with api_errors():
        vpc_id = _vpc_of(ec2, spec.subnet_id)
        group = _find_group(ec2, spec, vpc_id)
        if group is None:
            try:
                group_id = ec2.create_security_group(
                    GroupName=spec.security_group_name,
                    Description=f"crimpl: SSH to {spec.server_name} from the owner address only",
                    VpcId=vpc_id,
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": _crimpl_only_tags(spec)}],
                )["GroupId"]
                missing, needs_self = cidrs, True
            except bx.ClientError as exc:
                if error_code(exc) != "InvalidGroup.Duplicate":
                    raise
                # Another `up` created it at the same moment: check it like any existing group.
                group = _find_group(ec2, spec, vpc_id)
        if group is not None:
            group_id = group["GroupId"]
            missing, needs_self = _check_adopted_group(ec2, spec, group, cidrs)
        # One rule per call: EC2 refuses the whole call when one of its rules exists already.
        for permission in ([ssh_permission(missing)] if missing else []) + \
                ([self_permission(group_id)] if needs_self else []):
            try:
                ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[permission])
            except bx.ClientError as exc:
                if error_code(exc) != "InvalidPermission.Duplicate":  # added by a concurrent `up`
                    raise
    return group_id


def _find_group(ec2, spec, vpc_id):
    found = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [spec.security_group_name]},
        {"Name": "vpc-id", "Values": [vpc_id]},
    ])["SecurityGroups"]
    return found[0] if found else None


def _check_adopted_group(ec2, spec, group, cidrs):
    """Return ``(cidrs the existing group lacks, whether it lacks the rule between its members)``;
    raise if it lets in anything else."""
    group_id, name = group["GroupId"], group["GroupName"]
    have, extra, foreign, has_self = set(), [], [], False
    for rule in group.get("IpPermissions", []):
        if _is_self_rule(rule, group_id):
            has_self = True
            continue
        sources = ([r["CidrIp"] for r in rule.get("IpRanges", [])]
                   + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])])
        is_ssh = (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) == ("tcp", 22, 22)
        if not is_ssh or rule.get("UserIdGroupPairs") or rule.get("PrefixListIds"):
            protocol = "all protocols" if rule.get("IpProtocol") == "-1" else (
                f"{rule.get('IpProtocol')} {rule.get('FromPort')}-{rule.get('ToPort')}")
            foreign.append(f"{protocol} from {', '.join(sources) or 'other groups or prefix lists'}")
            continue
        for source in sources:
            if source in cidrs:
                have.add(source)
            else:
                extra.append(source)
    advice = (f"delete it (aws ec2 delete-security-group --group-id {group_id}) and run up again, "
              "or set SecurityGroupId (crimpl:securityGroupId) to a group you manage")
    if foreign:
        raise ConfigError(f"security group {name} ({group_id}) exists and lets in more than SSH: "
                          f"{'; '.join(foreign)}: {advice}")
    if extra:
        if not _is_ours(group.get("Tags", []), spec.server_name):
            raise ConfigError(f"security group {name} ({group_id}) exists, crimpl did not create it, and it "
                              f"lets SSH in from {', '.join(extra)}: {advice}")
        # crimpl's own group from an earlier run: those were the caller's addresses then.
        warn(f"security group {name}: no longer letting SSH in from {', '.join(extra)}")
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[ssh_permission(extra)])
    return [c for c in cidrs if c not in have], not has_self


def _is_self_rule(rule, group_id):
    """Is ``rule`` exactly :func:`self_permission`: every protocol, from the group itself only?"""
    pairs = rule.get("UserIdGroupPairs") or []
    return (rule.get("IpProtocol") == "-1" and len(pairs) == 1 and pairs[0].get("GroupId") == group_id
            and not rule.get("IpRanges") and not rule.get("Ipv6Ranges") and not rule.get("PrefixListIds"))


def self_permission(group_id: str) -> dict[str, Any]:
    """Return the rule that lets the server's nodes talk to each other: everything from ``group_id``.

    Its source is the group itself, so only instances in the group (the nodes of
    the server) are let in, on their private addresses; it opens nothing to any network.
    """
    return {"IpProtocol": "-1",
            "UserIdGroupPairs": [{"GroupId": group_id, "Description": "crimpl: between the nodes of the server"}]}


def ssh_permission(cidrs: Iterable[str]) -> dict[str, Any]:
    """Return the one ingress rule crimpl's security group has: TCP 22 from ``cidrs``.

    IPv4 networks go in ``IpRanges``, IPv6 ones in ``Ipv6Ranges``: EC2 takes each only in its own field.
    """
    cidrs = list(cidrs)
    description = "crimpl: SSH from the owner"
    return {
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": c, "Description": description} for c in cidrs if ":" not in c],
        "Ipv6Ranges": [{"CidrIpv6": c, "Description": description} for c in cidrs if ":" in c],
    }


def _vpc_of(ec2, subnet_id):
    if subnet_id:
        subnets = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
        return subnets[0]["VpcId"]
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise AWSError("this region has no default VPC: set SubnetId (and SecurityGroupId) in the config")
    return vpcs[0]["VpcId"]


def _crimpl_only_tags(spec):
    """The tags of what crimpl creates besides the instances: without a node's host key and rank."""
    return [{"Key": k, "Value": v} for k, v in spec.tags.items() if k not in (HOST_KEY_TAG, NODE_RANK_TAG)]


def placement_group_params(spec: InstanceSpec) -> dict[str, Any]:
    """Return the parameters of ``CreatePlacementGroup`` for ``spec`` (which has a ``placement``)."""
    return {
        "GroupName": spec.placement_group_name,
        "Strategy": spec.placement,
        "TagSpecifications": [{"ResourceType": "placement-group", "Tags": _crimpl_only_tags(spec)}],
    }


def ensure_placement_group(ec2: Any, spec: InstanceSpec) -> str | None:
    """Create the placement group of ``spec`` unless it exists; return its name (None: no placement).

    :raises AWSError: if EC2 refuses, or answers something that is not an EC2 answer
        (an endpoint without placement groups).
    """
    if not spec.placement:
        return None
    import botocore.exceptions as bx
    from botocore.parsers import ResponseParserError

    name = spec.placement_group_name
    with api_errors():
        try:
            ec2.create_placement_group(**placement_group_params(spec))
        except bx.ClientError as exc:
            if error_code(exc) != "InvalidPlacementGroup.Duplicate":  # an earlier or concurrent `up`
                raise
        except ResponseParserError as exc:
            raise AWSError(f"EC2 gave no readable answer to creating placement group {name} "
                           f"({str(exc).splitlines()[0]}): this endpoint may not support placement groups; "
                           "leave out placement (crimpl:placement)") from exc
    return name


def client_token(server_name: str, gone: Iterable[str], attempt: int = 0, now: datetime | None = None,
                 rank: int = 0) -> str:
    """Return the ``ClientToken`` of a launch: the same for every `up` of one node of a server at one time.

    EC2 launches once per token: a second RunInstances with the same token (a
    retry, or another `up` at the same moment) gets the first one's instance or
    an ``IdempotentParameterMismatch``, never a second instance. A server
    launched again after a destroy needs a new token: ``gone`` (the ids of the
    name's terminated instances, which EC2 lists for about an hour) and the UTC
    hour change it; ``attempt`` moves past a token EC2 still holds anyway. Each
    node ``rank`` has its own token: the nodes are separate launches.
    """
    hour = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H")
    parts = [server_name, hour, *sorted(gone), str(attempt), f"rank {rank}"]
    return f"crimpl-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:48]}"  # EC2 takes 64 characters


def launch_nodes(ec2: Any, spec: InstanceSpec, cidrs: Iterable[str],
                 ranks: Iterable[int] | None = None) -> list[tuple[dict, bool]]:
    """Launch nodes of ``spec``, each once, even when another `up` launches it at the same moment.

    The key pair, security group and placement group are made once for all of
    them. Two guards per node: a ``ClientToken`` derived from the server name
    and the rank (:func:`client_token`), with which EC2 itself launches once;
    and :func:`settle` after the launch, which keeps the oldest instance of
    that rank and terminates the others, for endpoints that do not honour the
    token (moto_server does not). Other ranks are never touched.

    :param cidrs: networks allowed to SSH when crimpl creates the security group.
    :param ranks: the ranks to launch (default: all, ``0`` to ``spec.nnodes - 1``).
    :returns: per rank, in the order given, ``(instance, launched)``: the node's instance
        as EC2 describes it, and whether this call launched it (False: another `up` did).
    """
    image_id = spec.image_id or newest_ubuntu_lts(ec2)
    key_name = ensure_key_pair(ec2, spec)
    group_id = ensure_security_group(ec2, spec, cidrs)
    ensure_placement_group(ec2, spec)
    gone = [i["InstanceId"]
            for i in find_instances(ec2, spec.server_name, states=("shutting-down", "terminated"))]
    nodes = [spec.node(rank) for rank in (range(spec.nnodes) if ranks is None else ranks)]
    return [_launch_node(ec2, node, run_instances_params(node, image_id, key_name, [group_id]), gone)
            for node in nodes]


def _launch_node(ec2, spec, params, gone):
    """Launch node ``spec.rank`` with ``params`` unless another `up` did; ``(instance, launched)``."""
    import botocore.exceptions as bx

    for attempt in range(TOKEN_ATTEMPTS):
        mine = None
        with api_errors():
            try:
                token = client_token(spec.server_name, gone, attempt, rank=spec.rank)
                mine = ec2.run_instances(**params, ClientToken=token)["Instances"][0]
            except bx.ClientError as exc:
                if error_code(exc) != "IdempotentParameterMismatch":
                    raise
        if mine is not None and state_of(mine) in LIVE_STATES:
            return settle(ec2, spec.server_name, mine, rank=spec.rank)
        # The token is another `up`'s (adopt its instance, which EC2 may list only
        # a few seconds later) or one of long ago (try the next token).
        deadline = time.monotonic() + (TOKEN_WAIT if mine is None else 0)
        while True:
            winner, _ = settle(ec2, spec.server_name, rank=spec.rank)
            if winner is not None:
                return winner, False
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
    raise AWSError(f"EC2 did not launch node {spec.rank} of {spec.server_name}: every client token tried "
                   "was taken; check `crimpl list` and run up again")


def settle(ec2: Any, server_name: str, mine: dict | None = None, rank: int | None = None
           ) -> tuple[dict | None, bool]:
    """Keep one live instance of node ``rank`` of ``server_name`` and terminate that rank's others.

    The one kept is the first launched, ties to the lower id (as
    :func:`find_instances` orders them), so concurrent callers agree on it.
    Instances of other ranks are never touched.

    :param mine: the instance this caller just launched (EC2 may not list it yet).
    :param rank: the node rank; default: ``mine``'s, else 0.
    :returns: ``(kept, is_mine)``; ``kept`` is None when the rank has no live instance.
    """
    if rank is None:
        rank = rank_of(mine) if mine is not None else 0
    live = [i for i in find_instances(ec2, server_name, states=LIVE_STATES) if rank_of(i) == rank]
    if mine is not None and mine["InstanceId"] not in {i["InstanceId"] for i in live}:
        live = sorted([*live, mine], key=_launch_order)
    if not live:
        return None, False
    kept, extra = live[0], [i["InstanceId"] for i in live[1:]]
    if extra:
        warn(f"{len(live)} instances carried node {rank} of {server_name} (launched at the same moment): "
             f"keeping {kept['InstanceId']}, terminating {', '.join(extra)}")
        terminate(ec2, *extra)
    return kept, mine is not None and kept["InstanceId"] == mine["InstanceId"]


def delete_created_resources(ec2: Any, server_name: str) -> list[str]:
    """Delete the key pair, security group and placement group crimpl created for ``server_name``.

    The key pair and security group are found by their tags, so they go even
    when no instance is left; the placement group is named by the
    ``crimpl:placement-group`` tag of the server's instances (EC2 lists
    terminated ones for about an hour). The groups can only go once no instance
    uses them; call this after the instances are terminated.

    :returns: what was deleted, e.g. ``["key pair crimpl-x", "security group sg-... (crimpl-x-ssh)"]``.
    """
    import botocore.exceptions as bx

    filters = [{"Name": f"tag:{NAME_TAG}", "Values": [server_name]},
               {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    removed = []
    with api_errors():
        for pair in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]:
            # By name: every EC2 endpoint (moto_server too) accepts KeyName; not all accept KeyPairId.
            ec2.delete_key_pair(KeyName=pair["KeyName"])
            removed.append(f"key pair {pair['KeyName']}")
        for group in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
            removed.append(f"security group {group['GroupId']} ({group['GroupName']})")
        placements = {tags_of(i)[PLACEMENT_TAG] for i in find_instances(ec2, server_name, include_terminated=True)
                      if PLACEMENT_TAG in tags_of(i)}
        for name in sorted(placements):
            try:
                ec2.delete_placement_group(GroupName=name)
                removed.append(f"placement group {name}")
            except bx.ClientError as exc:
                if error_code(exc) != "InvalidPlacementGroup.Unknown":  # deleted by an earlier run
                    raise
    return removed


# ---------------------------------------------------------------------------
# Lifecycle


def start(ec2: Any, instance_id: str) -> None:
    """Ask EC2 to start ``instance_id``."""
    with api_errors(instance_id):
        ec2.start_instances(InstanceIds=[instance_id])


def stop(ec2: Any, instance_id: str) -> None:
    """Ask EC2 to stop ``instance_id``."""
    with api_errors(instance_id):
        ec2.stop_instances(InstanceIds=[instance_id])


def terminate(ec2: Any, *instance_ids: str) -> None:
    """Ask EC2 to terminate ``instance_ids``."""
    with api_errors(instance_ids[0] if len(instance_ids) == 1 else None):
        ec2.terminate_instances(InstanceIds=list(instance_ids))


def wait_for_state(ec2: Any, instance_id: str, wanted: str | Iterable[str], timeout: float = DEFAULT_TIMEOUT,
                   interval: float = POLL_INTERVAL) -> dict:
    """Poll until ``instance_id`` is in one of the ``wanted`` states; return its description.

    :raises ConfigError: if ``timeout`` or ``interval`` is not a positive, finite number of seconds.
    :raises InstanceStateError: if it reaches ``terminated`` when that is not
        wanted, or is not there within ``timeout`` seconds.
    """
    for name, value in (("timeout", timeout), ("interval", interval)):
        # nan never compares >= a deadline, so it would wait forever.
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    deadline = time.monotonic() + timeout
    while True:
        instance = describe(ec2, instance_id)
        state = state_of(instance)
        if state in wanted:
            return instance
        if state == "terminated":
            raise InstanceStateError(
                f"instance {instance_id} was terminated while waiting for it to be {'/'.join(wanted)}",
                instance_id, state,
            )
        if time.monotonic() >= deadline:
            raise InstanceStateError(
                f"instance {instance_id} is still {state} after {timeout:.0f} s "
                f"(waited for {'/'.join(wanted)}); check it in the EC2 console",
                instance_id, state,
            )
        time.sleep(interval)


def hours_since(launch_time: datetime, now: datetime | None = None) -> float:
    """Return the hours between ``launch_time`` (EC2's, timezone-aware) and now."""
    now = now or datetime.now(timezone.utc)
    return (now - launch_time).total_seconds() / 3600
