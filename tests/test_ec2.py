"""EC2 servers from named configs, against moto_server over real HTTP.

Launch (image, tags, names, user data and host key, key pair, security group,
volume), re-attach from a fresh process, lifecycle and waits, AWS errors,
list_instances and terminate_all.
"""

import base64
import http.server
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

import boto3
import pytest
import yaml
from cli_helper import run_cli
from sandbox import SSH_CIDRS, NEWEST_UBUNTU_LTS, CheckIP, LoopbackHTTPServer, free_port, host_key_from_user_data

import crimpl
from crimpl import (AWSEC2, AWSEC2_Config, AWSError, ConfigError, InstanceNotFoundError,
                    InstanceStateError, list_instances, pricing, terminate_all)
from crimpl import ec2 as crimpl_ec2
from crimpl.config import build_spec
from crimpl.ec2 import ssh_permission
from crimpl.hostkeys import public_line_of
from crimpl.server import destroy_server
from crimpl.stack import read_stack, spec_for_stack

LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]


# -- helpers -------------------------------------------------------------------------


def instances(ec2, **tags):
    """Non-terminated instances with the given tags (tag key -> value)."""
    filters = [{"Name": "instance-state-name", "Values": LIVE}]
    filters += [{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()]
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def describe(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def tags_of(instance):
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def user_data_of(ec2, instance_id):
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def crimpl_groups(ec2):
    return [g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"].startswith("crimpl-")]


def launch_plain_instance(ec2, **tags):
    """An instance launched directly with boto3, not by crimpl."""
    params = {"ImageId": NEWEST_UBUNTU_LTS, "InstanceType": "c6a.large", "MinCount": 1, "MaxCount": 1}
    if tags:
        params["TagSpecifications"] = [{"ResourceType": "instance",
                                        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]
    return ec2.run_instances(**params)["Instances"][0]["InstanceId"]


def one_line(exc_info):
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


@pytest.fixture
def checkip(monkeypatch):
    """Serve a fixed answer as the caller's public address and point CRIMPL_CHECKIP_URL at it."""
    servers = []

    def serve(body):
        server = CheckIP(body)
        servers.append(server)
        monkeypatch.setenv("CRIMPL_CHECKIP_URL", server.url)
        return server

    yield serve
    for server in servers:
        server.stop()


class EC2Proxy(LoopbackHTTPServer):
    """An HTTP proxy in front of moto_server; :meth:`answer` may answer a request itself.

    Point ``AWS_ENDPOINT_URL`` at ``proxy.url``: crimpl's requests go proxy ->
    moto_server unchanged unless :meth:`answer` returns a response for them.
    """

    def __init__(self, upstream):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                query = urllib.parse.parse_qs(body.decode() + "&" + urllib.parse.urlsplit(self.path).query)
                params = {k: v[0] for k, v in query.items()}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                status, data, kind = proxy.answer(params, lambda: proxy.forward(self.path, body, headers))
                self.send_response(status)
                self.send_header("Content-Type", kind or "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.upstream = upstream
        super().__init__(Handler)

    def forward(self, path, body, headers):
        """Send the request to moto_server; return ``(status, body, content type)``."""
        request = urllib.request.Request(self.upstream + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read(), response.headers.get("Content-Type")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type")

    def answer(self, params, forward):
        """Return the response to a request (``params``: its parameters); default: moto_server's."""
        return forward()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Recorder(EC2Proxy):
    """Records the EC2 Action (``actions``) and the parameters (``requests``) of every request, in order."""

    def __init__(self, upstream):
        self.actions, self.requests = [], []
        super().__init__(upstream)

    def answer(self, params, forward):
        self.actions.append(params.get("Action", "?"))
        self.requests.append(params)
        return forward()


@pytest.fixture
def recorder(aws, monkeypatch):
    """A :class:`Recorder` in front of moto_server, with AWS_ENDPOINT_URL pointing at it."""
    with Recorder(aws.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


def after(actions, action):
    """The actions recorded after the last ``action``."""
    assert action in actions, actions
    return actions[len(actions) - actions[::-1].index(action):]


# -- image -----------------------------------------------------------------------------


def test_default_image_is_newest_ubuntu_lts_amd64_from_canonical(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)

    assert describe(ec2, server.instanceId)["ImageId"] == NEWEST_UBUNTU_LTS


def test_explicit_image_id_wins_over_the_lookup(ec2, key_file):
    jammy = "ami-005fc0f236362e99f"
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, ImageId=jammy)

    server = AWSEC2.new(config=config, nprocs=2)

    assert describe(ec2, server.instanceId)["ImageId"] == jammy


# -- tags and names ----------------------------------------------------------------------


def test_new_instance_carries_crimpl_tags_user_tags_and_name(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"project": "alpha", "cost": 7})

    server = AWSEC2.new(config=config, nprocs=2, server_name="alpha-run")

    tags = tags_of(describe(ec2, server.instanceId))
    assert tags["crimpl:managed"] == "true"
    assert tags["crimpl:name"] == "alpha-run"
    assert tags["crimpl:version"] == crimpl.__version__
    assert tags["Name"] == "alpha-run"
    assert tags["project"] == "alpha"
    assert tags["cost"] == "7"
    assert server.server_name == "alpha-run"


def test_default_server_name_is_generated_readable_and_unique(ec2, config):
    first = AWSEC2.new(config=config, nprocs=2)
    second = AWSEC2.new(config=config, nprocs=2)

    for server in (first, second):
        name = server.server_name
        assert re.fullmatch(r"crimpl-[a-z0-9-]{3,20}", name), name
        assert tags_of(describe(ec2, server.instanceId))["Name"] == name
    assert first.server_name != second.server_name


@pytest.mark.parametrize("first_state", ["running", "stopped"])
def test_second_new_with_live_name_is_refused_and_launches_nothing(ec2, config, first_state):
    first = AWSEC2.new(config=config, nprocs=2, server_name="twin")
    if first_state == "stopped":
        first.stop()

    with pytest.raises(InstanceStateError) as caught:
        AWSEC2.new(config=config, nprocs=2, server_name="twin")

    assert "twin" in one_line(caught)
    assert first.instanceId in str(caught.value)
    assert [i["InstanceId"] for i in instances(ec2, **{"crimpl:name": "twin"})] == [first.instanceId]


def test_name_can_be_reused_after_terminate(ec2, config):
    first = AWSEC2.new(config=config, nprocs=2, server_name="again")
    first.terminate()

    second = AWSEC2.new(config=config, nprocs=2, server_name="again")

    assert second.instanceId != first.instanceId
    assert second.state == "running"
    assert [i["InstanceId"] for i in instances(ec2, **{"crimpl:name": "again"})] == [second.instanceId]


def test_invalid_server_name_is_refused_before_launch(ec2, config):
    with pytest.raises(ConfigError, match="server name"):
        AWSEC2.new(config=config, nprocs=2, server_name="no spaces/please")

    assert instances(ec2) == []


# -- user data, host key, key pair --------------------------------------------------------


def test_user_data_installs_host_key_that_is_pinned_by_instance_id(ec2, config, crimpl_home):
    server = AWSEC2.new(config=config, nprocs=2)

    data = user_data_of(ec2, server.instanceId)
    assert data.startswith("#cloud-config\n")
    assert "ssh_keys:" in data
    private, public = host_key_from_user_data(data)
    assert public.startswith("ssh-ed25519 ")
    assert public_line_of(private) == public
    known_hosts = crimpl_home / "known_hosts"
    assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
    pins = [line.split() for line in known_hosts.read_text().splitlines()]
    assert [server.instanceId] + public.split()[:2] in pins
    assert tags_of(describe(ec2, server.instanceId))["crimpl:host-key"] == public


def test_each_instance_gets_its_own_host_key(ec2, config):
    first = AWSEC2.new(config=config, nprocs=2)
    second = AWSEC2.new(config=config, nprocs=2)

    keys = {host_key_from_user_data(user_data_of(ec2, s.instanceId))[1] for s in (first, second)}
    assert len(keys) == 2


def test_key_pair_is_imported_from_key_file_when_no_key_name(ec2, config, key_file):
    server = AWSEC2.new(config=config, nprocs=2, server_name="keyed")

    assert describe(ec2, server.instanceId)["KeyName"] == "crimpl-keyed"
    pairs = ec2.describe_key_pairs(KeyNames=["crimpl-keyed"], IncludePublicKey=True)["KeyPairs"]
    assert pairs[0]["PublicKey"].split()[:2] == key_file.with_suffix(".pub").read_text().split()[:2]


def test_existing_key_name_is_used_as_is_and_kept_at_terminate(ec2, key_file):
    ec2.import_key_pair(KeyName="team-key", PublicKeyMaterial=key_file.with_suffix(".pub").read_bytes())
    config = AWSEC2_Config(KeyFile=str(key_file), KeyName="team-key", ssh_cidrs=SSH_CIDRS)

    server = AWSEC2.new(config=config, nprocs=2)

    assert describe(ec2, server.instanceId)["KeyName"] == "team-key"
    assert [p["KeyName"] for p in ec2.describe_key_pairs()["KeyPairs"]] == ["team-key"]
    server.terminate()
    assert [p["KeyName"] for p in ec2.describe_key_pairs()["KeyPairs"]] == ["team-key"]


# -- security group and volume --------------------------------------------------------------


def all_rules(ec2, instance_id):
    group_ids = [g["GroupId"] for g in describe(ec2, instance_id)["SecurityGroups"]]
    groups = ec2.describe_security_groups(GroupIds=group_ids)["SecurityGroups"]
    return [(g["GroupId"], rule) for g in groups for rule in g["IpPermissions"]]


def ssh_rules(ec2, instance_id):
    """The rules of the instance's groups but the one between the server's own nodes."""
    return [rule for group_id, rule in all_rules(ec2, instance_id)
            if [p["GroupId"] for p in rule.get("UserIdGroupPairs", [])] != [group_id]]


def cidrs_of(rule):
    return sorted(r["CidrIp"] for r in rule.get("IpRanges", []))


def test_created_security_group_allows_only_ssh_from_ssh_cidrs(ec2, key_file):
    cidrs = ["198.51.100.0/24", "203.0.113.7/32"]
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=cidrs)

    server = AWSEC2.new(config=config, nprocs=2, server_name="guarded")

    (group_id, rule), (_, between_nodes) = sorted(all_rules(ec2, server.instanceId),
                                                  key=lambda r: r[1]["IpProtocol"] != "tcp")
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert cidrs_of(rule) == cidrs
    assert rule.get("Ipv6Ranges", []) == [] and rule.get("UserIdGroupPairs", []) == []
    # The only other rule lets in the server's own nodes (members of the group), from no network.
    assert between_nodes["IpProtocol"] == "-1"
    assert [p["GroupId"] for p in between_nodes["UserIdGroupPairs"]] == [group_id]
    assert between_nodes["IpRanges"] == between_nodes["Ipv6Ranges"] == between_nodes["PrefixListIds"] == []
    assert [g["GroupName"] for g in crimpl_groups(ec2)] == ["crimpl-guarded-ssh"]


def test_ssh_cidrs_argument_overrides_config(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2, ssh_cidrs=["192.0.2.0/28"])

    (rule,) = ssh_rules(ec2, server.instanceId)
    assert cidrs_of(rule) == ["192.0.2.0/28"]


def test_security_group_defaults_to_callers_address(ec2, key_file, checkip):
    checkip("198.51.100.23\n")
    config = AWSEC2_Config(KeyFile=str(key_file))

    server = AWSEC2.new(config=config, nprocs=2)

    (rule,) = ssh_rules(ec2, server.instanceId)
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert cidrs_of(rule) == ["198.51.100.23/32"]


def test_unreachable_checkip_is_config_error_telling_to_set_ssh_cidrs(ec2, key_file, monkeypatch):
    monkeypatch.setenv("CRIMPL_CHECKIP_URL", f"http://127.0.0.1:{free_port()}/")
    config = AWSEC2_Config(KeyFile=str(key_file))

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(config=config, nprocs=2)

    assert "ssh_cidrs" in one_line(caught)
    assert instances(ec2) == []


def test_checkip_answer_that_is_not_an_address_is_config_error(ec2, key_file, checkip):
    checkip("<html>rate limited</html>")
    config = AWSEC2_Config(KeyFile=str(key_file))

    with pytest.raises(ConfigError, match="ssh_cidrs"):
        AWSEC2.new(config=config, nprocs=2)

    assert instances(ec2) == []


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_ssh_from_whole_internet_is_refused_and_nothing_launched(ec2, config, cidr):
    with pytest.raises(ConfigError, match="internet"):
        AWSEC2.new(config=config, nprocs=2, ssh_cidrs=[cidr])

    assert instances(ec2) == []
    assert crimpl_groups(ec2) == []


def test_given_security_group_is_used_and_none_created(ec2, key_file, monkeypatch):
    # No address lookup is needed either: the checkip service is unreachable.
    monkeypatch.setenv("CRIMPL_CHECKIP_URL", f"http://127.0.0.1:{free_port()}/")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = ec2.create_security_group(GroupName="team-ssh", Description="team", VpcId=vpc)["GroupId"]
    config = AWSEC2_Config(KeyFile=str(key_file), SecurityGroupId=group)

    server = AWSEC2.new(config=config, nprocs=2)

    assert [g["GroupId"] for g in describe(ec2, server.instanceId)["SecurityGroups"]] == [group]
    assert crimpl_groups(ec2) == []
    server.terminate()
    assert ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["GroupName"] == "team-ssh"


def test_volume_size_is_applied_to_root_volume(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, VolumeSize=77)

    server = AWSEC2.new(config=config, nprocs=2)

    mappings = describe(ec2, server.instanceId)["BlockDeviceMappings"]
    volume_ids = [m["Ebs"]["VolumeId"] for m in mappings]
    sizes = [v["Size"] for v in ec2.describe_volumes(VolumeIds=volume_ids)["Volumes"]]
    assert sizes == [77]


def test_config_region_is_where_the_instance_launches(aws, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, region="eu-west-1")

    server = AWSEC2.new(config=config, nprocs=2)

    assert [i["InstanceId"] for i in instances(boto3.client("ec2", region_name="eu-west-1"))] == [server.instanceId]
    assert instances(boto3.client("ec2", region_name="us-east-1")) == []


# -- re-attach --------------------------------------------------------------------------------

ATTACH_SCRIPT = """
import json, sys, crimpl
by_id = crimpl.AWSEC2(sys.argv[1])
by_name = crimpl.AWSEC2(server_name=sys.argv[2])
print(json.dumps({"id": by_id.instanceId, "id_name": by_id.server_name, "id_state": by_id.state,
                  "name_id": by_name.instanceId, "name_type": by_name.instance_type}))
"""


def test_fresh_process_with_empty_home_finds_instance_by_id_and_by_name(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=4, server_name="findme")
    env = dict(os.environ, CRIMPL_HOME=str(tmp_path / "empty-home"))

    result = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, server.instanceId, "findme"],
                            env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "id": server.instanceId, "id_name": "findme", "id_state": "running",
        "name_id": server.instanceId, "name_type": pricing.instance_type_for(4),
    }


@pytest.mark.parametrize("args, kwargs", [((), {}), (("i-0123456789abcdef0",), {"server_name": "x"})])
def test_attach_needs_exactly_one_of_id_and_name(args, kwargs):
    with pytest.raises(ConfigError, match="exactly one"):
        AWSEC2(*args, **kwargs)


def test_attach_by_unknown_name_is_not_found_listing_servers(ec2, config):
    AWSEC2.new(config=config, nprocs=2, server_name="present")

    with pytest.raises(InstanceNotFoundError) as caught:
        AWSEC2(server_name="absent")

    message = one_line(caught)
    assert "absent" in message and "present" in message


def test_attach_by_name_ignores_instances_not_managed_by_crimpl(ec2):
    launch_plain_instance(ec2, **{"crimpl:name": "impostor"})

    with pytest.raises(InstanceNotFoundError):
        AWSEC2(server_name="impostor")


# -- lifecycle -----------------------------------------------------------------------------------


def test_state_is_read_live_from_ec2(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)

    ec2.stop_instances(InstanceIds=[server.instanceId])
    assert server.state == "stopped"
    ec2.start_instances(InstanceIds=[server.instanceId])
    assert server.state == "running"


@pytest.mark.parametrize("action, wanted", [("stop", "stopped"), ("start", "running"),
                                            ("terminate", "terminated")])
def test_action_waits_by_default_until_state_is_reached(recorder, config, action, wanted):
    server = AWSEC2.new(config=config, nprocs=2)
    if action == "start":
        server.stop()
    api_call = {"stop": "StopInstances", "start": "StartInstances", "terminate": "TerminateInstances"}[action]

    getattr(server, action)()

    assert "DescribeInstances" in after(recorder.actions, api_call)
    assert server.state == wanted


@pytest.mark.parametrize("action", ["stop", "start", "terminate"])
def test_action_without_wait_returns_without_polling(recorder, config, action):
    server = AWSEC2.new(config=config, nprocs=2)
    if action == "start":
        server.stop()
    api_call = {"stop": "StopInstances", "start": "StartInstances", "terminate": "TerminateInstances"}[action]

    returned = getattr(server, action)(wait=False)

    assert returned is server
    assert after(recorder.actions, api_call) == []


def test_new_without_wait_polls_less_than_new_that_waits(recorder, config):
    AWSEC2.new(config=config, nprocs=2)
    waited = after(recorder.actions, "RunInstances").count("DescribeInstances")

    AWSEC2.new(config=config, nprocs=2, wait=False)

    assert after(recorder.actions, "RunInstances").count("DescribeInstances") < waited


def test_public_ip_is_read_again_after_start(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)
    before = server.public_ip
    server.stop()

    server.start()

    now = describe(ec2, server.instanceId)["PublicIpAddress"]
    assert server.public_ip == now
    assert now != before  # moto_server, like EC2, hands out a new public address at start


def test_starting_terminated_instance_is_one_line_state_error(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)
    server.terminate()

    with pytest.raises(InstanceStateError) as caught:
        server.start()

    assert "terminated" in one_line(caught)
    assert caught.value.state == "terminated"
    assert caught.value.instance_id == server.instanceId


def test_stopping_terminated_instance_is_state_error(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)
    server.terminate()

    with pytest.raises(InstanceStateError, match="terminated"):
        server.stop()


def test_unknown_instance_id_is_not_found(ec2):
    with pytest.raises(InstanceNotFoundError) as caught:
        AWSEC2("i-0000000000000000a")

    assert "i-0000000000000000a" in one_line(caught)


@pytest.mark.parametrize("bad_id", ["not-an-id", "", "ami-0a5c3558529277641", 42])
def test_malformed_instance_id_is_not_found_with_a_hint(ec2, bad_id):
    with pytest.raises(InstanceNotFoundError, match="i-0123456789abcdef0"):
        AWSEC2(bad_id)


@pytest.mark.parametrize("action", ["state", "public_ip", "start", "stop", "terminate"])
def test_any_action_on_instance_that_no_longer_exists_is_not_found(aws, config, action):
    server = AWSEC2.new(config=config, nprocs=2)
    aws.reset()  # EC2 forgets the instance, as it does an hour after termination

    with pytest.raises(InstanceNotFoundError) as caught:
        value = getattr(server, action)
        if callable(value):
            value()

    assert server.instanceId in one_line(caught)


def test_terminate_removes_created_key_pair_security_group_and_host_pin(ec2, config, crimpl_home):
    keep = AWSEC2.new(config=config, nprocs=2, server_name="keep")
    server = AWSEC2.new(config=config, nprocs=2, server_name="goner")
    assert server.instanceId in (crimpl_home / "known_hosts").read_text()

    server.terminate()

    assert server.state == "terminated"
    assert [p["KeyName"] for p in ec2.describe_key_pairs()["KeyPairs"]] == ["crimpl-keep"]
    assert [g["GroupName"] for g in crimpl_groups(ec2)] == ["crimpl-keep-ssh"]
    pinned = (crimpl_home / "known_hosts").read_text()
    assert server.instanceId not in pinned
    assert keep.instanceId in pinned


# -- AWS errors ------------------------------------------------------------------------------------


@pytest.fixture
def no_credentials(aws, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        empty = tmp_path / f"empty-{name}"
        empty.write_text("")
        monkeypatch.setenv(name, str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.parametrize("call", ["list", "attach", "new"])
def test_missing_credentials_is_aws_error_telling_to_configure_them(no_credentials, config, call):
    with pytest.raises(AWSError) as caught:
        {"list": lambda: list_instances(),
         "attach": lambda: AWSEC2("i-0123456789abcdef0"),
         "new": lambda: AWSEC2.new(config=config, nprocs=2)}[call]()

    message = one_line(caught)
    assert "credentials" in message
    assert "aws configure" in message or "AWS_ACCESS_KEY_ID" in message


def test_missing_region_is_aws_error(aws, config, monkeypatch):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")

    with pytest.raises(AWSError) as caught:
        AWSEC2.new(config=config, nprocs=2)

    assert "region" in one_line(caught)
    with pytest.raises(AWSError, match="region"):
        list_instances()


def test_aws_region_alone_selects_the_region(aws, config, monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")

    server = AWSEC2.new(config=config, nprocs=2)

    assert [i["InstanceId"] for i in instances(boto3.client("ec2", region_name="eu-west-1"))] == [server.instanceId]
    assert [r.instance_id for r in list_instances()] == [server.instanceId]


def test_unreachable_endpoint_is_aws_error(aws, config, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")

    with pytest.raises(AWSError) as caught:
        list_instances()

    assert "AWS_ENDPOINT_URL" in one_line(caught)
    with pytest.raises(AWSError):
        AWSEC2("i-0123456789abcdef0")


def test_unknown_profile_is_aws_error(aws, config, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")

    with pytest.raises(AWSError) as caught:
        list_instances()

    assert "no-such-profile" in one_line(caught)
    with pytest.raises(AWSError):
        AWSEC2.new(config=config, nprocs=2)


# -- list_instances and terminate_all ------------------------------------------------------------------


def test_list_instances_shows_every_live_crimpl_instance_and_nothing_else(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS)
    running = AWSEC2.new(config=config, nprocs=2, server_name="runner")
    stopped = AWSEC2.new(config=config, nprocs=4, server_name="sleeper")
    stopped.stop()
    AWSEC2.new(config=config, nprocs=2, server_name="gone").terminate()
    plain = launch_plain_instance(ec2, Name="not-crimpl")

    rows = {r.instance_id: r for r in list_instances()}

    assert set(rows) == {running.instanceId, stopped.instanceId}
    assert plain not in rows
    run = rows[running.instanceId]
    live = describe(ec2, running.instanceId)
    assert (run.name, run.state, run.instance_type) == ("runner", "running", live["InstanceType"])
    assert run.launch_time == live["LaunchTime"]
    assert run.public_ip == live["PublicIpAddress"]
    assert isinstance(run.estimated_cost_usd, float) and run.estimated_cost_usd >= 0
    sleep = rows[stopped.instanceId]
    assert (sleep.name, sleep.state, sleep.instance_type) == ("sleeper", "stopped", pricing.instance_type_for(4))
    assert sleep.estimated_cost_usd == 0


def test_list_cost_of_type_missing_from_table_is_unknown(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, InstanceType="t2.micro")
    server = AWSEC2.new(config=config)

    (row,) = list_instances()

    assert row.instance_id == server.instanceId
    assert row.estimated_cost_usd is None


def test_list_instances_of_an_empty_account_is_empty(ec2):
    launch_plain_instance(ec2)

    assert list_instances() == []


def test_terminate_all_without_confirmation_ends_every_crimpl_instance(ec2, config):
    servers = [AWSEC2.new(config=config, nprocs=2) for _ in range(2)]
    servers[1].stop()
    plain = launch_plain_instance(ec2)

    ended = terminate_all(confirm=False)

    assert sorted(ended) == sorted(s.instanceId for s in servers)
    assert [s.state for s in servers] == ["terminated", "terminated"]
    assert describe(ec2, plain)["State"]["Name"] == "running"
    assert list_instances() == []
    assert crimpl_groups(ec2) == []


@pytest.mark.parametrize("answer", ["no", "", "y"])
def test_terminate_all_not_answered_yes_terminates_nothing(ec2, config, answer):
    server = AWSEC2.new(config=config, nprocs=2)
    questions = []

    ended = terminate_all(ask=lambda q: questions.append(q) or answer)

    assert ended == []
    assert server.instanceId in questions[0]
    assert server.state == "running"


def test_terminate_all_answered_yes_terminates(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2)
    questions = []

    ended = terminate_all(ask=lambda q: questions.append(q) or "yes")

    assert ended == [server.instanceId]
    assert len(questions) == 1
    assert server.state == "terminated"


def test_terminate_all_with_no_input_to_read_terminates_nothing(ec2, config, monkeypatch, caplog):
    server = AWSEC2.new(config=config, nprocs=2)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # stdin at its end, as with `< /dev/null`

    ended = terminate_all()

    assert ended == []
    assert server.state == "running"
    assert "no answer" in caplog.text


# -- one name, one server (two `up` at once, duplicates, destroy by tags) -------------------------


def stack_project(directory, key_file, **keys):
    """A project folder with a Pulumi.dev.yaml (server crimpl-dev) for the CLI tests."""
    directory.mkdir(exist_ok=True)
    config = {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:sshCidrs": SSH_CIDRS,
              **{f"crimpl:{k}": v for k, v in keys.items()}}
    (directory / "Pulumi.dev.yaml").write_text(yaml.safe_dump({"config": config}))
    return directory


def crimpl_tagged(name):
    return {"crimpl:managed": "true", "crimpl:name": name}


def up_at_once(config, name, count=2):
    """Run ``count`` AWSEC2.up of one server name in threads started together; return their results."""
    specs = [build_spec(config, nprocs=2, server_name=name) for _ in range(count)]  # each its own host key
    clients = [crimpl_ec2.client() for _ in specs]
    start = threading.Barrier(count)
    results, errors = [None] * count, []

    def up(index):
        start.wait()
        try:
            results[index] = AWSEC2.up(specs[index], config, ec2_client=clients[index])
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=up, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    return results


@pytest.mark.parametrize("given", [False, True], ids=["crimpl-creates-key-pair-and-group", "both-given"])
def test_two_ups_at_once_leave_exactly_one_live_instance(ec2, config, key_file, given):
    if given:  # nothing to create first: the two launches race each other directly
        ec2.import_key_pair(KeyName="team-key", PublicKeyMaterial=key_file.with_suffix(".pub").read_bytes())
        vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
        group = ec2.create_security_group(GroupName="team-ssh", Description="team", VpcId=vpc)["GroupId"]
        config = AWSEC2_Config(KeyFile=str(key_file), KeyName="team-key", SecurityGroupId=group)
    # moto_server ignores ClientToken, so this is the re-check after launch at work.
    results = up_at_once(config, "racer")

    live = instances(ec2, **{"crimpl:name": "racer"})
    assert len(live) == 1, [(i["InstanceId"], i["State"]["Name"]) for i in live]
    assert live[0]["InstanceId"] in {server.instanceId for server, _ in results}


def test_two_ups_at_once_on_an_endpoint_honouring_client_tokens_launch_once(aws, ec2, config, monkeypatch):
    with HonoursClientToken(aws.url) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.url)
        results = up_at_once(config, "racer")

    assert endpoint.launched == 1
    [live] = instances(ec2, **{"crimpl:name": "racer"})
    assert [server.instanceId for server, _ in results] == [live["InstanceId"]] * 2
    assert sorted(launched for _, launched in results) == [False, True]


def test_launch_sends_a_client_token_that_changes_only_after_a_destroy(recorder, config):
    def tokens():
        return [r["ClientToken"] for r in recorder.requests if r.get("Action") == "RunInstances"]

    spec = build_spec(config, nprocs=2, server_name="tokened")
    first, _ = AWSEC2.up(spec, config)
    destroy_server("tokened")
    AWSEC2.up(build_spec(config, nprocs=2, server_name="tokened"), config)
    AWSEC2.up(build_spec(config, nprocs=2, server_name="other"), config)

    sent = tokens()
    assert len(sent) == 3 and all(sent)
    assert len(set(sent)) == 3  # a new generation after the destroy; another name, another token


def test_client_token_is_one_per_server_generation_and_hour():
    at = datetime(2026, 11, 30, 8, 59, 59, tzinfo=timezone.utc)
    token = crimpl_ec2.client_token("box", ["i-0a"], now=at)

    assert token == crimpl_ec2.client_token("box", ["i-0a"], now=at.replace(minute=0, second=0))
    others = [crimpl_ec2.client_token("box", ["i-0a"], now=at + timedelta(seconds=1)),
              crimpl_ec2.client_token("box", ["i-0a", "i-0b"], now=at),
              crimpl_ec2.client_token("box", ["i-0a"], attempt=1, now=at),
              crimpl_ec2.client_token("box2", ["i-0a"], now=at)]
    assert token not in others and len(set(others)) == len(others)
    assert len(token) <= 64 and token.isascii()


def test_destroy_ends_every_instance_carrying_the_name_and_says_so(ec2, key_file, tmp_path):
    project = stack_project(tmp_path / "project", key_file)
    server, _ = AWSEC2.up(spec_for_stack(read_stack("dev", project)), AWSEC2_Config(KeyFile=str(key_file)))
    twin = launch_plain_instance(ec2, **crimpl_tagged("crimpl-dev"))  # a duplicate from an older crimpl

    result = run_cli("destroy", "--provisioner", "boto3", "--yes", cwd=project)

    assert result.code == 0, result
    assert "2 instances carried the name crimpl-dev" in result.stdout
    assert server.instanceId in result.stdout and twin in result.stdout
    assert instances(ec2, **{"crimpl:name": "crimpl-dev"}) == []
    assert ec2.describe_key_pairs()["KeyPairs"] == [] and crimpl_groups(ec2) == []


def test_status_and_list_show_every_instance_carrying_the_name(ec2, key_file, tmp_path):
    project = stack_project(tmp_path / "project", key_file)
    server, _ = AWSEC2.up(spec_for_stack(read_stack("dev", project)), AWSEC2_Config(KeyFile=str(key_file)))
    twin = launch_plain_instance(ec2, **crimpl_tagged("crimpl-dev"))

    status = run_cli("status", cwd=project)
    listing = run_cli("list", cwd=project)

    assert status.code == 0, status
    assert "2 instances carry the name crimpl-dev" in status.stdout
    assert {server.instanceId, twin} <= set(re.findall(r"i-[0-9a-f]+", status.stdout))
    assert listing.code == 0, listing
    [warning] = [line for line in listing.stdout.splitlines() if line.startswith("warning:")]
    assert "2 instances carry the name crimpl-dev" in warning
    assert {server.instanceId, twin} == set(re.findall(r"i-[0-9a-f]+", warning))


@pytest.mark.parametrize("how", ["out of band", "failure after TerminateInstances"])
def test_destroy_after_the_instance_is_gone_still_removes_key_pair_group_and_pin(
        ec2, aws, key_file, tmp_path, crimpl_home, monkeypatch, how):
    project = stack_project(tmp_path / "project", key_file)
    server, _ = AWSEC2.up(spec_for_stack(read_stack("dev", project)), AWSEC2_Config(KeyFile=str(key_file)))
    if how == "out of band":
        ec2.terminate_instances(InstanceIds=[server.instanceId])
    else:
        with FailingAfter("TerminateInstances", aws.url) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
            failed = run_cli("destroy", "--provisioner", "boto3", "--yes", cwd=project)
        assert failed.code != 0 and "Traceback" not in failed.stderr
        monkeypatch.setenv("AWS_ENDPOINT_URL", aws.url)
    assert ec2.describe_key_pairs()["KeyPairs"] and crimpl_groups(ec2)

    result = run_cli("destroy", "--provisioner", "boto3", "--yes", cwd=project)

    assert result.code == 0, result
    assert "nothing to destroy" not in result.stdout
    assert "removed key pair crimpl-crimpl-dev, security group" in result.stdout
    assert f"forgot the host key of {server.instanceId}" in result.stdout
    assert ec2.describe_key_pairs()["KeyPairs"] == [] and crimpl_groups(ec2) == []
    assert server.instanceId not in (crimpl_home / "known_hosts").read_text()
    assert describe(ec2, server.instanceId)["State"]["Name"] == "terminated"
    again = run_cli("destroy", "--provisioner", "boto3", "--yes", cwd=project)
    assert "nothing to destroy" in again.stdout


class FailingAfter(EC2Proxy):
    """Passes requests until ``action`` has gone through, then fails every one (503).

    As an endpoint that goes away right after EC2 accepted a request.
    """

    def __init__(self, action, upstream):
        self.action, self.failing = action, False
        super().__init__(upstream)

    def answer(self, params, forward):
        if self.failing:
            return 503, b"", "text/plain"
        response = forward()
        self.failing = params.get("Action") == self.action
        return response


class HonoursClientToken(EC2Proxy):
    """moto_server with what it lacks: RunInstances is idempotent per ClientToken, as on AWS.

    A token seen before returns the first response when the parameters are the
    same, and IdempotentParameterMismatch when they differ. ``launched`` counts
    the RunInstances that reached moto_server.
    """

    MISMATCH = (b'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
                b"<Code>IdempotentParameterMismatch</Code><Message>the client token was used with other "
                b"parameters</Message></Error></Errors><RequestID>proxy</RequestID></Response>")

    def __init__(self, upstream):
        self.lock, self.seen, self.launched = threading.Lock(), {}, 0
        super().__init__(upstream)

    def answer(self, params, forward):
        token = params.get("ClientToken")
        if params.get("Action") != "RunInstances" or not token:
            return forward()
        with self.lock:  # as EC2, one launch per token even when two arrive at once
            if token in self.seen:
                first_params, response = self.seen[token]
                return response if first_params == params else (400, self.MISMATCH, "text/xml")
            response = forward()
            self.launched += 1
            self.seen[token] = (params, response)
            return response


# -- what an `up` adopts: key pair and security group of crimpl's names -----------------------------


def other_public_key(tmp_path, kind="ed25519"):
    folder = tmp_path / f"other-{kind}"
    folder.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(folder / "key")], check=True)
    return (folder / "key.pub").read_bytes()


def public_keys(ec2):
    pairs = ec2.describe_key_pairs(IncludePublicKey=True)["KeyPairs"]
    return {p["KeyName"]: p["PublicKey"].split()[:2] for p in pairs}


@pytest.mark.parametrize("kind", ["ed25519", "rsa"])
def test_existing_key_pair_with_the_key_files_key_is_used(ec2, tmp_path, kind):
    key = tmp_path / "login" / "key"
    key.parent.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
    ec2.import_key_pair(KeyName="crimpl-mine", PublicKeyMaterial=key.with_suffix(".pub").read_bytes())
    config = AWSEC2_Config(KeyFile=str(key), ssh_cidrs=SSH_CIDRS)

    server = AWSEC2.new(config=config, nprocs=2, server_name="mine")

    assert describe(ec2, server.instanceId)["KeyName"] == "crimpl-mine"


def test_crimpls_own_key_pair_holding_a_rotated_key_is_replaced(ec2, config, key_file, tmp_path):
    ec2.import_key_pair(KeyName="crimpl-rotated", PublicKeyMaterial=other_public_key(tmp_path),
                        TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
                            {"Key": k, "Value": v} for k, v in crimpl_tagged("rotated").items()]}])

    server = AWSEC2.new(config=config, nprocs=2, server_name="rotated")

    assert describe(ec2, server.instanceId)["KeyName"] == "crimpl-rotated"
    assert public_keys(ec2)["crimpl-rotated"] == key_file.with_suffix(".pub").read_text().split()[:2]


@pytest.mark.parametrize("whose", ["not crimpl's", "used by a live instance"])
def test_key_pair_holding_another_key_that_cannot_be_replaced_is_refused(ec2, config, tmp_path, whose):
    tags = crimpl_tagged("stale") if whose == "used by a live instance" else {}
    old = other_public_key(tmp_path)
    ec2.import_key_pair(KeyName="crimpl-stale", PublicKeyMaterial=old, TagSpecifications=[
        {"ResourceType": "key-pair", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()] or
         [{"Key": "owner", "Value": "someone"}]}])
    if whose == "used by a live instance":
        ec2.run_instances(ImageId=NEWEST_UBUNTU_LTS, InstanceType="c6a.large", MinCount=1, MaxCount=1,
                          KeyName="crimpl-stale")

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(config=config, nprocs=2, server_name="stale")

    message = one_line(caught)
    assert "crimpl-stale" in message and "delete-key-pair" in message
    assert instances(ec2, **{"crimpl:name": "stale"}) == []
    assert public_keys(ec2)["crimpl-stale"] == old.decode().split()[:2]


def precreate_group(ec2, name, permission, tags=None):
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    kwargs = {"TagSpecifications": [{"ResourceType": "security-group",
                                     "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}]} if tags else {}
    group = ec2.create_security_group(GroupName=name, Description="pre-existing", VpcId=vpc, **kwargs)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[permission])
    return group


@pytest.mark.parametrize("permission", [
    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
    {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "IpRanges": [{"CidrIp": SSH_CIDRS[0]}]},
    {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
], ids=["all-protocols-from-anywhere", "all-ports", "ssh-from-anywhere"])
def test_existing_group_of_crimpls_name_that_lets_in_more_is_refused(ec2, config, permission):
    group = precreate_group(ec2, "crimpl-open-ssh", permission)

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(config=config, nprocs=2, server_name="open")

    message = one_line(caught)
    assert group in message and "delete-security-group" in message and "SecurityGroupId" in message
    assert instances(ec2, **{"crimpl:name": "open"}) == []


def test_crimpls_own_group_with_an_old_address_is_narrowed_to_the_current_ones(ec2, config):
    group = precreate_group(ec2, "crimpl-moved-ssh", ssh_permission(["198.51.100.99/32"]),
                            tags=crimpl_tagged("moved"))

    server = AWSEC2.new(config=config, nprocs=2, server_name="moved")

    assert [g["GroupId"] for g in describe(ec2, server.instanceId)["SecurityGroups"]] == [group]
    (rule,) = ssh_rules(ec2, server.instanceId)
    assert cidrs_of(rule) == SSH_CIDRS


def test_ipv6_network_goes_in_the_ipv6_ranges_of_the_rule(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=["2001:db8:1::/48", "203.0.113.7/32"])

    server = AWSEC2.new(config=config, nprocs=2, server_name="six")

    (rule,) = ssh_rules(ec2, server.instanceId)
    assert cidrs_of(rule) == ["203.0.113.7/32"]
    assert [r["CidrIpv6"] for r in rule["Ipv6Ranges"]] == ["2001:db8:1::/48"]


@pytest.mark.parametrize("cidrs", [["0.0.0.0/1", "128.0.0.0/1"], ["2001:db8::/31"]])
def test_ssh_cidrs_covering_too_much_together_are_refused_and_nothing_launched(ec2, config, cidrs):
    with pytest.raises(ConfigError, match="ssh_cidrs"):
        AWSEC2.new(config=config, nprocs=2, ssh_cidrs=cidrs)

    assert instances(ec2) == [] and crimpl_groups(ec2) == []


# -- client cache and waits -----------------------------------------------------------------------


def test_client_is_reused_until_an_aws_setting_changes(aws, monkeypatch):
    first = crimpl_ec2.client()
    assert crimpl_ec2.client() is first
    assert crimpl_ec2.client("eu-west-1") is not first

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")

    changed = crimpl_ec2.client()
    assert changed is not first
    assert changed._request_signer._credentials.access_key == "another-key"


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -5])
def test_wait_with_a_timeout_that_never_ends_is_refused(ec2, config, timeout):
    server = AWSEC2.new(config=config, nprocs=2, wait=False)

    with pytest.raises(ConfigError, match="timeout must be a positive, finite number"):
        server.stop(timeout=timeout)


# -- autostop and lifetime at launch ---------------------------------------------------------


def test_new_with_autostop_and_lifetime_puts_the_watchdog_in_the_user_data(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2, server_name="guarded", autostop="30m", max_lifetime="12h",
                        autostop_down=True)
    data = yaml.safe_load(user_data_of(ec2, server.instanceId))
    files = {f["path"]: f["content"] for f in data["write_files"]}
    assert "AUTOSTOP=1800\n" in files["/home/ubuntu/crimpl/watchdog/autostop.conf"]
    assert files["/home/ubuntu/crimpl/watchdog/lifetime.conf"] == "LIFETIME=43200\n"
    attr = ec2.describe_instance_attribute(InstanceId=server.instanceId,
                                           Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    assert server.tags["crimpl:autostop"] == "30m (terminate)"
    assert server.tags["crimpl:max-lifetime"] == "12h (terminate)"


def test_new_without_autostop_installs_an_idle_watchdog_and_no_tags(ec2, config):
    server = AWSEC2.new(config=config, nprocs=2, server_name="plain")
    files = {f["path"]: f["content"]
             for f in yaml.safe_load(user_data_of(ec2, server.instanceId))["write_files"]}
    assert "AUTOSTOP=0\n" in files["/home/ubuntu/crimpl/watchdog/autostop.conf"]
    assert files["/home/ubuntu/crimpl/watchdog/lifetime.conf"] == "LIFETIME=0\n"
    assert "crimpl:autostop" not in server.tags
    assert server.watchdog_summary() is None


def test_new_refuses_a_lifetime_shorter_than_autostop_before_launching(ec2, config):
    with pytest.raises(ConfigError, match="max_lifetime 10m is shorter than autostop 1h"):
        AWSEC2.new(config=config, nprocs=2, server_name="never", autostop="1h", max_lifetime="10m")
    assert instances(ec2) == []


def test_spot_config_launches_a_persistent_spot_instance_that_stops_on_interruption(ec2, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, spot=True)
    spec = build_spec(config, nprocs=2, server_name="spotty")
    params = crimpl_ec2.run_instances_params(spec, "ami-0123456789abcdef0", "k", ["sg-1"])
    assert params["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}}
    server = AWSEC2.new(config=config, nprocs=2, server_name="spotty")
    assert server.describe().get("InstanceLifecycle") == "spot"
    on_demand = AWSEC2.new(config=AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS), nprocs=2,
                           server_name="steady")
    assert on_demand.describe().get("InstanceLifecycle") is None
