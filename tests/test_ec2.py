"""EC2 servers from named configs, against moto_server over real HTTP.

Launch (image, tags, names, user data and host key, key pair, security group,
volume), re-attach from a fresh process, lifecycle and waits, AWS errors,
list_instances and terminate_all.
"""

import base64
import http.server
import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import boto3
import pytest
from sandbox import NEWEST_UBUNTU_LTS, CheckIP, LoopbackHTTPServer, free_port

import crimpl
from crimpl import (AWSEC2, AWSEC2_Config, AWSError, ConfigError, InstanceNotFoundError,
                    InstanceStateError, list_instances, pricing, terminate_all)
from crimpl.hostkeys import host_key_from_user_data, public_line_of

SSH_CIDRS = ["203.0.113.7/32"]
LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]


# -- helpers -------------------------------------------------------------------------


@pytest.fixture
def ec2(aws):
    """A plain boto3 client on moto_server, to check what crimpl did."""
    return boto3.client("ec2")


@pytest.fixture
def config(key_file):
    return AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS)


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


@pytest.fixture
def recorder(aws, monkeypatch):
    """An HTTP proxy in front of moto_server that records the EC2 Action of every request.

    AWS_ENDPOINT_URL points at it, so crimpl's requests go proxy -> moto_server
    unchanged; ``recorder.actions`` is what crimpl asked EC2, in order.
    """
    actions = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            query = urllib.parse.parse_qs(body.decode() + "&" + urllib.parse.urlsplit(self.path).query)
            actions.append(query.get("Action", ["?"])[0])
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
            request = urllib.request.Request(aws.url + self.path, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, data, kind = response.status, response.read(), response.headers.get("Content-Type")
            except urllib.error.HTTPError as err:
                status, data, kind = err.code, err.read(), err.headers.get("Content-Type")
            self.send_response(status)
            self.send_header("Content-Type", kind or "text/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = LoopbackHTTPServer(Handler)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
    server.actions = actions
    yield server
    server.stop()


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


def ssh_rules(ec2, instance_id):
    group_ids = [g["GroupId"] for g in describe(ec2, instance_id)["SecurityGroups"]]
    groups = ec2.describe_security_groups(GroupIds=group_ids)["SecurityGroups"]
    return [rule for g in groups for rule in g["IpPermissions"]]


def cidrs_of(rule):
    return sorted(r["CidrIp"] for r in rule.get("IpRanges", []))


def test_created_security_group_allows_only_ssh_from_ssh_cidrs(ec2, key_file):
    cidrs = ["198.51.100.0/24", "203.0.113.7/32"]
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=cidrs)

    server = AWSEC2.new(config=config, nprocs=2, server_name="guarded")

    (rule,) = ssh_rules(ec2, server.instanceId)
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert cidrs_of(rule) == cidrs
    assert rule.get("Ipv6Ranges", []) == [] and rule.get("UserIdGroupPairs", []) == []
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
