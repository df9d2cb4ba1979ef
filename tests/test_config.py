"""AWSEC2_Config: validation on construction, saved configs, and how AWSEC2.new picks one."""

import json
import stat

import boto3
import pytest

import crimpl
from crimpl import AWSEC2, AWSEC2_Config, ConfigError
from sandbox import SSH_CIDRS



def config_error(**fields):
    """Build a config that must be refused; return the one-line message."""
    with pytest.raises(ConfigError) as caught:
        AWSEC2_Config(**fields)
    message = str(caught.value)
    assert "\n" not in message
    return message


def live_crimpl_instances():
    ec2 = boto3.client("ec2")
    pages = ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": "tag:crimpl:managed", "Values": ["true"]},
        {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
    ])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


# -- validation ------------------------------------------------------------------


def test_valid_config_keeps_given_values_and_defaults(key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), KeyName="team", VolumeSize=40, tags={"project": "x"})

    assert config.KeyFile == str(key_file)
    assert config.KeyName == "team"
    assert config.VolumeSize == 40
    assert config.tags == {"project": "x"}
    assert config.username == "ubuntu"
    assert config.ImageId is None


def test_missing_key_file_is_refused_naming_key_file():
    assert "KeyFile" in config_error()


def test_key_file_that_does_not_exist_is_refused_naming_key_file(tmp_path):
    assert "KeyFile" in config_error(KeyFile=str(tmp_path / "no-such-key"))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others_is_refused_with_chmod_advice(key_file, mode):
    key_file.chmod(mode)

    message = config_error(KeyFile=str(key_file))

    assert "KeyFile" in message
    assert "chmod 600" in message


def test_empty_key_name_is_refused_naming_key_name(key_file):
    assert "KeyName" in config_error(KeyFile=str(key_file), KeyName="")


@pytest.mark.parametrize("field, value", [
    ("VolumeSize", "big"),
    ("VolumeSize", True),
    ("VolumeSize", 2),
    ("InstanceType", 4),
    ("spot", "yes"),
    ("tags", ["project=x"]),
    ("ssh_cidrs", "203.0.113.7/32"),
    ("ImageId", "ubuntu-24.04"),
    ("host_key_policy", "trust-everything"),
    ("ssh_timeout", 0),
])
def test_wrong_value_is_refused_naming_the_field(key_file, field, value):
    message = config_error(KeyFile=str(key_file), **{field: value})

    assert message.startswith(field)


def test_unknown_field_is_refused_naming_it(key_file):
    assert "VolumSize" in config_error(KeyFile=str(key_file), VolumSize=30)


@pytest.mark.parametrize("cidr", ["203.0.113.7/33", "not-a-network", "300.1.2.3/32"])
def test_bad_cidr_is_refused_naming_ssh_cidrs(key_file, cidr):
    assert "ssh_cidrs" in config_error(KeyFile=str(key_file), ssh_cidrs=[cidr])


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_ssh_open_to_whole_internet_is_refused(key_file, cidr):
    message = config_error(KeyFile=str(key_file), ssh_cidrs=["203.0.113.7/32", cidr])

    assert "ssh_cidrs" in message
    assert "internet" in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1, -0.5, 0.0])
def test_number_that_is_not_finite_and_positive_is_refused_naming_the_field(key_file, value):
    message = config_error(KeyFile=str(key_file), ssh_timeout=value)

    assert message.startswith("ssh_timeout must be a positive, finite number")


@pytest.mark.parametrize("cidrs", [
    ["0.0.0.0/1", "128.0.0.0/1"],
    ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2", "192.0.0.0/2"],
    ["::/1", "8000::/1"],
])
def test_networks_that_together_are_the_whole_internet_are_refused(key_file, cidrs):
    message = config_error(KeyFile=str(key_file), ssh_cidrs=cidrs)

    assert message.startswith("ssh_cidrs") and "whole internet" in message


@pytest.mark.parametrize("cidrs", [["10.0.0.0/7"], ["10.0.0.0/8", "11.0.0.0/32"], ["2001:db8::/31"],
                                   ["2001:db8::/32", "2001:db9::/48"]])
def test_networks_that_together_are_larger_than_the_limit_are_refused(key_file, cidrs):
    message = config_error(KeyFile=str(key_file), ssh_cidrs=cidrs)

    assert message.startswith("ssh_cidrs") and "more than a /" in message


@pytest.mark.parametrize("cidrs, kept", [
    (["10.0.0.0/8", "2001:db8::/32"], ("10.0.0.0/8", "2001:db8::/32")),
    (["10.0.0.0/9", "2001:db8::/33", "203.0.113.7", "10.0.0.0/9"],
     ("10.0.0.0/9", "2001:db8::/33", "203.0.113.7/32")),
])
def test_networks_up_to_the_limit_are_kept_once_each_in_order(key_file, cidrs, kept):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=cidrs)

    assert config.ssh_cidrs == kept


def test_crimpl_home_that_is_a_file_is_a_one_line_config_error(key_file, tmp_path, monkeypatch):
    home = tmp_path / "not-a-folder"
    home.write_text("")
    monkeypatch.setenv("CRIMPL_HOME", str(home))

    with pytest.raises(ConfigError) as caught:
        AWSEC2_Config(KeyFile=str(key_file)).save("alpha")

    message = str(caught.value)
    assert "\n" not in message and "CRIMPL_HOME" in message and str(home) in message
    with pytest.raises(ConfigError, match="CRIMPL_HOME"):
        AWSEC2_Config.load()


@pytest.mark.parametrize("key", ["crimpl:name", "crimpl:managed", "aws:cloudformation:stack-name"])
def test_reserved_tag_key_is_refused_naming_it(key_file, key):
    message = config_error(KeyFile=str(key_file), tags={key: "mine"})

    assert "tag" in message
    assert key in message


# -- saving and loading ------------------------------------------------------------


def test_save_writes_private_file_with_names_and_paths_only(key_file, crimpl_home, monkeypatch):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    config = AWSEC2_Config(KeyFile=str(key_file), KeyName="team-key", SubnetId="subnet-0abc",
                           region="eu-west-1", tags={"project": "alpha"})

    path = config.save("work")

    assert path == crimpl_home / "configs" / "work.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert json.loads(text) == {"KeyFile": str(key_file), "KeyName": "team-key",
                                "SubnetId": "subnet-0abc", "region": "eu-west-1",
                                "tags": {"project": "alpha"}}
    private_body = "".join(key_file.read_text().splitlines()[1:-1])
    assert private_body[:40] not in text.replace("\n", "")
    assert key_file.with_suffix(".pub").read_text().split()[1] not in text
    assert secret not in text
    assert "FwoGZXIvYXdzEXAMPLETOKEN" not in text


def test_saved_config_loads_back_equal(key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), VolumeSize=64, ssh_cidrs=SSH_CIDRS, spot=True)
    config.save("big-disk")

    assert AWSEC2_Config.load("big-disk") == config
    assert crimpl.saved_config_names() == ["big-disk"]


@pytest.mark.parametrize("name", ["", "../escape", "has space", "a/b", "-dash-first", "x" * 64])
def test_saving_under_invalid_name_is_refused(key_file, crimpl_home, name):
    config = AWSEC2_Config(KeyFile=str(key_file))

    with pytest.raises(ConfigError, match="config name"):
        config.save(name)

    assert crimpl.saved_config_names() == []
    assert not (crimpl_home / "escape.json").exists()


def test_only_saved_config_is_used_by_new_without_config(aws, key_file):
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"project": "only-one"}).save("solo")

    server = AWSEC2.new(nprocs=2)

    assert server.tags["project"] == "only-one"
    assert server.config == AWSEC2_Config.load("solo")


def test_several_saved_configs_and_none_named_is_error_listing_them(aws, key_file):
    for name in ("alpha", "beta"):
        AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS).save(name)

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(nprocs=2)

    message = str(caught.value)
    assert "alpha" in message and "beta" in message
    assert "\n" not in message
    assert live_crimpl_instances() == []


def test_no_saved_config_is_error_saying_how_to_create_one(aws):
    with pytest.raises(ConfigError, match=r"save\("):
        AWSEC2.new(nprocs=2)

    assert live_crimpl_instances() == []


def test_unknown_config_name_is_error_listing_saved_names(aws, key_file):
    for name in ("alpha", "beta"):
        AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS).save(name)

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(config="gamma", nprocs=2)

    message = str(caught.value)
    assert "gamma" in message and "alpha" in message and "beta" in message
    assert live_crimpl_instances() == []


def test_invalid_config_name_given_to_new_is_refused(aws, key_file):
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS).save("alpha")

    with pytest.raises(ConfigError, match="saved configs: alpha$"):
        AWSEC2.new(config="../configs/alpha", nprocs=2)

    assert live_crimpl_instances() == []


def test_new_with_config_name_uses_that_saved_config(aws, key_file):
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"team": "a"}).save("alpha")
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"team": "b"}).save("beta")

    server = AWSEC2.new(config="beta", nprocs=2)

    assert server.tags["team"] == "b"


def test_new_with_config_object_uses_it_without_saving(aws, key_file):
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"team": "saved"}).save("alpha")
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, tags={"team": "given"})

    server = AWSEC2.new(config=config, nprocs=2)

    assert server.tags["team"] == "given"
    assert crimpl.saved_config_names() == ["alpha"]


@pytest.mark.parametrize("wrong", [42, ["alpha"], {"KeyFile": "x"}])
def test_config_of_wrong_type_is_refused(aws, key_file, wrong):
    AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS).save("alpha")

    with pytest.raises(ConfigError, match="config must be"):
        AWSEC2.new(config=wrong, nprocs=2)

    assert live_crimpl_instances() == []


def test_loading_with_a_non_string_name_is_refused(key_file):
    AWSEC2_Config(KeyFile=str(key_file)).save("alpha")

    with pytest.raises(ConfigError, match="string"):
        AWSEC2_Config.load(7)


def test_saved_config_edited_by_hand_into_invalid_is_refused_on_load(key_file, crimpl_home):
    path = AWSEC2_Config(KeyFile=str(key_file)).save("alpha")
    path.write_text(json.dumps({"KeyFile": str(key_file), "VolumeSize": "big"}))

    with pytest.raises(ConfigError, match="VolumeSize"):
        AWSEC2_Config.load("alpha")


# -- nodes and placement ------------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    (0, "from 1 to 64, got 0"), (-1, "from 1 to 64, got -1"), (65, "from 1 to 64, got 65"),
    ("x", "must be a int, got str 'x'"), (1.5, "must be a int, got float 1.5"), (True, "must be a int, got bool"),
])
def test_a_node_count_that_is_not_1_to_64_is_refused_naming_nnodes(key_file, value, words):
    message = config_error(KeyFile=str(key_file), nnodes=value)
    assert message.startswith("nnodes ") and words in message


def test_placement_other_than_cluster_is_refused_naming_it(key_file):
    assert config_error(KeyFile=str(key_file), placement="spread").startswith("placement must be cluster")


def test_a_bad_node_count_given_to_new_is_refused_before_anything_launches(aws, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS)
    with pytest.raises(ConfigError, match=r"^nnodes must be a whole number of nodes from 1 to 64, got 0$"):
        AWSEC2.new(config, nprocs=2, nnodes=0)
    assert live_crimpl_instances() == []


def test_each_node_of_the_spec_has_its_own_rank_host_key_and_user_data(key_file):
    from crimpl.config import build_spec
    from crimpl.hostkeys import generate_host_key
    from sandbox import host_key_from_user_data

    host_key = generate_host_key()
    spec = build_spec(AWSEC2_Config(KeyFile=str(key_file), nnodes=3), nprocs=2, server_name="trio",
                      host_key=host_key)
    nodes = spec.nodes
    assert [n.rank for n in nodes] == [0, 1, 2]
    assert [n.tags["crimpl:node-rank"] for n in nodes] == ["0", "1", "2"]
    assert nodes[0].user_data == spec.user_data and nodes[0].host_public_key == host_key[1]
    for node in nodes:
        private, public = host_key_from_user_data(node.user_data)
        assert public == node.host_public_key == node.tags["crimpl:host-key"]
        assert {k: v for k, v in node.tags.items() if k not in ("crimpl:host-key", "crimpl:node-rank")} == \
            {k: v for k, v in spec.tags.items() if k not in ("crimpl:host-key", "crimpl:node-rank")}
    assert len({n.host_public_key for n in nodes}) == 3
    with pytest.raises(ConfigError, match="trio has nodes 0 to 2, not 3"):
        spec.node(3)


def test_a_derived_node_host_key_is_the_same_every_time_and_openssh_reads_it(tmp_path):
    import subprocess

    from crimpl.config import node_host_key
    from crimpl.hostkeys import generate_host_key

    base = generate_host_key()
    assert node_host_key(base, 0) == base
    first = node_host_key(base, 1)
    assert first == node_host_key(base, 1) != node_host_key(base, 2)
    assert node_host_key(generate_host_key(), 1) != first
    path = tmp_path / "node1"
    path.write_text(first[0])
    path.chmod(0o600)
    read = subprocess.run(["ssh-keygen", "-y", "-f", str(path)], capture_output=True, text=True, check=True)
    assert read.stdout.split()[:2] == first[1].split()[:2]
