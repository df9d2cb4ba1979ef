"""EC2 through boto3 only: launch from a spec, find by tags, state, start/stop/terminate, waits.

Nothing here creates a client at import time. boto3's standard configuration
applies: the credential chain, ``AWS_PROFILE``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_EC2``.
Every botocore error is turned into a :class:`~crimpl.errors.CrimplError` here,
in :func:`api_errors`, with a message that says what to do.
"""

import base64
import contextlib
import os
import re
import time
from datetime import datetime, timezone

from .config import UBUNTU_NAME_PATTERN, UBUNTU_OWNER
from .errors import AWSError, InstanceNotFoundError, InstanceStateError

MANAGED_TAG = "crimpl:managed"
NAME_TAG = "crimpl:name"
ALIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
#: Poll every 1.5 s: boto3's own waiters poll every 15 s, far too slow for an interactive tool.
POLL_INTERVAL = 1.5
DEFAULT_TIMEOUT = 600.0


def client(region=None):
    """Return an EC2 client from boto3's standard configuration.

    :param region: region name; None: ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile's.
    :raises AWSError: if no region is configured anywhere or the profile is unknown.
    """
    import boto3
    import botocore.exceptions

    # boto3 reads only AWS_DEFAULT_REGION; AWS_REGION (what the other SDKs and our messages use) wins.
    region = region or os.environ.get("AWS_REGION") or None
    try:
        session = boto3.session.Session(region_name=region)
        if not session.region_name:
            raise AWSError(
                "no AWS region set: export AWS_REGION=us-east-1 (or set region in the crimpl config)"
            )
        return session.client("ec2")
    except botocore.exceptions.ProfileNotFound as exc:
        raise AWSError(f"{exc}: fix AWS_PROFILE or run `aws configure --profile NAME`") from exc


@contextlib.contextmanager
def api_errors(instance_id=None):
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
                "check the id and AWS_REGION (`invoke list` shows crimpl's instances)",
                instance_id,
            ) from exc
        if code in ("AuthFailure", "UnrecognizedClientException", "InvalidClientTokenId",
                    "SignatureDoesNotMatch", "ExpiredToken", "RequestExpired"):
            raise AWSError(f"AWS rejected the credentials ({code}): refresh them or check AWS_PROFILE") from exc
        if code in ("UnauthorizedOperation", "AccessDenied"):
            raise AWSError(f"not allowed by IAM ({code}): {message.splitlines()[0] if message else ''} "
                           "- grant the EC2 permissions listed in the README") from exc
        if code == "IncorrectInstanceState":
            raise InstanceStateError(f"{message}; check `invoke status`", instance_id) from exc
        raise AWSError(f"EC2 refused the request ({code}): {message}") from exc
    except bx.BotoCoreError as exc:
        raise AWSError(f"EC2 request failed: {exc}") from exc


# ---------------------------------------------------------------------------
# Images

_UBUNTU_VERSION = re.compile(r"ubuntu-[a-z]+-(\d+)\.(\d+)-amd64-server-")


def is_lts(name):
    """Return True if ``name`` is an Ubuntu LTS server image name (YY.04 with an even YY)."""
    match = _UBUNTU_VERSION.search(name)
    return bool(match) and match.group(2) == "04" and int(match.group(1)) % 2 == 0


def newest_ubuntu_lts(ec2):
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


def find_instances(ec2, name=None, include_terminated=False):
    """Return crimpl-managed instances (dicts as EC2 describes them), oldest launch first.

    :param name: only the instance(s) with this ``crimpl:name`` tag.
    :param include_terminated: also return terminated instances.
    """
    filters = _tag_filters(name)
    if not include_terminated:
        filters.append({"Name": "instance-state-name", "Values": list(ALIVE_STATES)})
    instances = []
    with api_errors():
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                instances.extend(reservation["Instances"])
    return sorted(instances, key=lambda i: i["LaunchTime"])


def describe(ec2, instance_id):
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


def tags_of(instance):
    """Return an instance's tags as a dict."""
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def state_of(instance):
    """Return an instance's state name (``running``, ``stopped``, ...)."""
    return instance["State"]["Name"]


def user_data(ec2, instance_id):
    """Return the decoded user data of ``instance_id`` ('' if none)."""
    with api_errors(instance_id):
        attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    value = attr.get("UserData", {}).get("Value")
    return base64.b64decode(value).decode() if value else ""


def set_shutdown_behavior(ec2, instance_id, behavior):
    """Set what a shutdown from inside the instance does: ``stop`` or ``terminate``."""
    with api_errors(instance_id):
        # The Attribute/Value form: EC2 accepts it for this attribute, and so does moto_server,
        # which ignores the InstanceInitiatedShutdownBehavior={"Value": ...} form.
        ec2.modify_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior", Value=behavior
        )


def shutdown_behavior(ec2, instance_id):
    """Return the instance's ``InstanceInitiatedShutdownBehavior``."""
    with api_errors(instance_id):
        attr = ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
        )
    return attr["InstanceInitiatedShutdownBehavior"]["Value"]


# ---------------------------------------------------------------------------
# Launching from a spec


def run_instances_params(spec, image_id, key_name, security_group_ids):
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
    if security_group_ids:
        params["SecurityGroupIds"] = list(security_group_ids)
    if spec.spot:
        # A spot instance that can be stopped must be persistent and stop, not terminate, on interruption.
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"},
        }
    return params


def ensure_key_pair(ec2, spec):
    """Return the key pair name for ``spec``, importing its public key when it names none.

    An imported key pair is tagged with the server name so ``destroy`` can remove it.
    """
    if spec.key_name:
        return spec.key_name
    name = spec.key_pair_name
    with api_errors():
        existing = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
        if not existing:
            ec2.import_key_pair(
                KeyName=name,
                PublicKeyMaterial=spec.public_key.encode(),
                TagSpecifications=[{"ResourceType": "key-pair", "Tags": _crimpl_only_tags(spec)}],
            )
    return name


def ensure_security_group(ec2, spec, cidrs):
    """Return the security group id for ``spec``: the named one, or crimpl's SSH-only group.

    crimpl's group allows TCP 22 from ``cidrs`` only and nothing else in.
    """
    if spec.security_group_id:
        return spec.security_group_id
    with api_errors():
        vpc_id = _vpc_of(ec2, spec.subnet_id)
        found = ec2.describe_security_groups(Filters=[
            {"Name": "group-name", "Values": [spec.security_group_name]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ])["SecurityGroups"]
        if found:
            group_id = found[0]["GroupId"]
            have = {r.get("CidrIp") for p in found[0]["IpPermissions"] for r in p.get("IpRanges", [])}
            missing = [c for c in cidrs if c not in have]
        else:
            group_id = ec2.create_security_group(
                GroupName=spec.security_group_name,
                Description=f"crimpl: SSH to {spec.server_name} from the owner address only",
                VpcId=vpc_id,
                TagSpecifications=[{"ResourceType": "security-group", "Tags": _crimpl_only_tags(spec)}],
            )["GroupId"]
            missing = list(cidrs)
        if missing:
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[ssh_permission(missing)])
    return group_id


def ssh_permission(cidrs):
    """Return the one ingress rule crimpl's security group has: TCP 22 from ``cidrs``."""
    return {
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
        "IpRanges": [{"CidrIp": c, "Description": "crimpl: SSH from the owner"} for c in cidrs],
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
    return [{"Key": k, "Value": v} for k, v in spec.tags.items() if k != "crimpl:host-key"]


def launch(ec2, spec, cidrs):
    """Launch one instance from ``spec`` and return its description.

    :param cidrs: networks allowed to SSH when crimpl creates the security group.
    """
    image_id = spec.image_id or newest_ubuntu_lts(ec2)
    key_name = ensure_key_pair(ec2, spec)
    group_id = ensure_security_group(ec2, spec, cidrs)
    params = run_instances_params(spec, image_id, key_name, [group_id])
    with api_errors():
        return ec2.run_instances(**params)["Instances"][0]


def delete_created_resources(ec2, spec_or_name):
    """Delete the key pair and security group crimpl created for a server, if any.

    The security group can only go once its instance is terminated; call this after.
    """
    name = getattr(spec_or_name, "server_name", spec_or_name)
    filters = [{"Name": f"tag:{NAME_TAG}", "Values": [name]}, {"Name": f"tag:{MANAGED_TAG}", "Values": ["true"]}]
    removed = []
    with api_errors():
        for pair in ec2.describe_key_pairs(Filters=filters)["KeyPairs"]:
            # By name: every EC2 endpoint (moto_server too) accepts KeyName; not all accept KeyPairId.
            ec2.delete_key_pair(KeyName=pair["KeyName"])
            removed.append(pair["KeyName"])
        for group in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
            removed.append(group["GroupId"])
    return removed


# ---------------------------------------------------------------------------
# Lifecycle


def start(ec2, instance_id):
    """Ask EC2 to start ``instance_id``."""
    with api_errors(instance_id):
        ec2.start_instances(InstanceIds=[instance_id])


def stop(ec2, instance_id):
    """Ask EC2 to stop ``instance_id``."""
    with api_errors(instance_id):
        ec2.stop_instances(InstanceIds=[instance_id])


def terminate(ec2, instance_id):
    """Ask EC2 to terminate ``instance_id``."""
    with api_errors(instance_id):
        ec2.terminate_instances(InstanceIds=[instance_id])


def wait_for_state(ec2, instance_id, wanted, timeout=DEFAULT_TIMEOUT, interval=POLL_INTERVAL):
    """Poll until ``instance_id`` is in one of the ``wanted`` states; return its description.

    :raises InstanceStateError: if it reaches ``terminated`` when that is not
        wanted, or is not there within ``timeout`` seconds.
    """
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


def hours_since(launch_time, now=None):
    """Return the hours between ``launch_time`` (EC2's, timezone-aware) and now."""
    now = now or datetime.now(timezone.utc)
    return (now - launch_time).total_seconds() / 3600
