"""The Pulumi program (infra/__main__.py), run under Pulumi's unit-test mocks.

As pulumi/examples testing-unit-py: a ``pulumi.runtime.Mocks`` subclass records
every resource and answers the image look-ups from a realistic image list;
stack config is set before the program runs; outputs are resolved inside
``@pulumi.runtime.test``. The parity tests render one stack both ways, through
``crimpl.ec2.run_instances_params`` and through the program, and compare.
"""

import fnmatch
import json
import re
import runpy
from pathlib import Path

import pulumi
import pytest
import yaml
from pulumi.runtime.mocks import MockMonitor
from sandbox import AMIS, CANONICAL, NEWEST_UBUNTU_LTS, _ami, host_key_from_user_data

from crimpl import ec2, pricing
from crimpl._version import __version__
from crimpl.config import UBUNTU_NAME_PATTERN, UBUNTU_OWNER, AWSEC2_Config
from crimpl.hostkeys import generate_host_key, public_line_of
from crimpl.stack import read_stack, spec_for_stack

PROGRAM = Path(__file__).resolve().parent.parent / "infra" / "__main__.py"
SECRET_SIG = pulumi.runtime.rpc._special_secret_sig
SIG_KEY = pulumi.runtime.rpc._special_sig_key
INSTANCE = "aws:ec2/instance:Instance"
KEY_PAIR = "aws:ec2/keyPair:KeyPair"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
MOCK_GROUP_ID = "sg-0a1b2c3d4e5f60718"
MOCK_VPC_ID = "vpc-0c0ffee0c0ffee000"
HOST_KEY = generate_host_key()
CALLER = "198.51.100.7/32"


# ---------------------------------------------------------------------------
# The mocks


def matching_images(images, owners, filters):
    """Apply EC2's server-side image filters (owners, name glob, exact values)."""
    found = []
    for image in images:
        if owners and image["owner_id"] not in owners:
            continue
        ok = True
        for flt in filters or []:
            name, values = flt["name"], flt["values"]
            have = image["state"] if name == "state" else image[name]
            if not any(fnmatch.fnmatchcase(have, v) for v in values):
                ok = False
        if ok:
            found.append(image)
    return found


class RecordingMocks(pulumi.runtime.Mocks):
    """Records every resource; answers getAmi / getAmiIds / getSubnet like AWS would."""

    def __init__(self, images):
        self.images = images
        self.resources = []
        self.calls = []

    def new_resource(self, args):
        self.resources.append((args.typ, args.name, args.inputs))
        state = dict(args.inputs)
        if args.typ == INSTANCE:
            rank = 0 if args.name == "server" else int(args.name.removeprefix("server-"))
            state.update(publicIp=f"203.0.113.{10 + rank}", privateIp=f"10.0.0.{5 + rank}")
            return f"i-0123456789abcdef{rank}", state
        if args.typ == SECURITY_GROUP:
            return MOCK_GROUP_ID, state
        return f"{args.name}-id", state

    def call(self, args):
        self.calls.append((args.token, args.args))
        if args.token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args["id"], "vpcId": MOCK_VPC_ID}
        images = matching_images(self.images, args.args.get("owners"), args.args.get("filters"))
        regex = args.args.get("nameRegex")
        if regex:
            images = [i for i in images if re.search(regex, i["name"])]
        images.sort(key=lambda i: i["creation_date"], reverse=True)
        if args.token == "aws:ec2/getAmiIds:getAmiIds":
            return {"id": "ami-ids", "ids": [i["ami_id"] for i in images]}
        if args.token == "aws:ec2/getAmi:getAmi":
            if not images or (len(images) > 1 and not args.args.get("mostRecent")):
                raise Exception("Your query returned no results or more than one")
            image = images[0]
            return {"id": image["ami_id"], "imageId": image["ami_id"], "name": image["name"],
                    "architecture": image["architecture"], "creationDate": image["creation_date"]}
        raise Exception(f"unexpected invoke {args.token}")


class RecordingMonitor(MockMonitor):
    """Also records the resource options the mocks do not see."""

    def __init__(self, mocks):
        super().__init__(mocks)
        self.options = {}

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method name
        self.options[request.name] = {
            "ignore_changes": list(request.ignoreChanges),
            "delete_before_replace": request.deleteBeforeReplace,
        }
        return super().RegisterResource(request)


class Run:
    """What one run of the program declared."""

    def __init__(self, mocks, monitor, exports):
        self.mocks, self.options, self.exports = mocks, monitor.options, exports

    def all(self, typ):
        return [inputs for t, _, inputs in self.mocks.resources if t == typ]

    def one(self, typ):
        found = self.all(typ)
        assert len(found) == 1, f"{typ}: {len(found)} declared"
        return found[0]

    def invoked(self, token):
        return [args for t, args in self.mocks.calls if t == token]


def as_pulumi_config(config):
    """Turn a stack file's ``config:`` section into what the program gets: strings, JSON objects."""
    out = {}
    for key, value in config.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, (dict, list)):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


@pytest.fixture
def program(monkeypatch):
    """Run the program for a stack config; return a :class:`Run`."""

    def run(config, stack="dev", images=AMIS, host_key=HOST_KEY, secret_keys=("crimpl:hostKey",)):
        mocks = RecordingMocks(images)
        monitor = RecordingMonitor(mocks)
        pulumi.runtime.set_mocks(mocks, project="crimpl", stack=stack, preview=False, monitor=monitor)
        values = as_pulumi_config(config)
        if host_key is not None:
            values.setdefault("crimpl:hostKey", host_key[0])
        pulumi.runtime.set_all_config(values, list(secret_keys))
        exports, resolved = {}, {}
        monkeypatch.setattr(pulumi, "export", lambda name, value: exports.__setitem__(name, value))

        @pulumi.runtime.test
        def execute():
            runpy.run_path(str(PROGRAM), run_name="__main__")
            return pulumi.Output.all(**exports).apply(resolved.update)

        execute()
        return Run(mocks, monitor, resolved)

    yield run
    pulumi.runtime.set_all_config({}, [])


@pytest.fixture
def base(key_file):
    """The smallest complete stack config."""
    return {"aws:region": "us-east-1", "crimpl:keyFile": str(key_file), "crimpl:nprocs": 4,
            "crimpl:sshCidrs": [CALLER]}


def unsecret(value):
    assert isinstance(value, dict) and value.get(SIG_KEY) == SECRET_SIG, f"not a secret: {value!r}"
    return value["value"]


# ---------------------------------------------------------------------------
# Instance type, image, key pair


def test_instance_type_is_the_cheapest_for_nprocs(program, base):
    assert program(base).one(INSTANCE)["instanceType"] == pricing.instance_type_for(4)
    many = program({**base, "crimpl:nprocs": 64}).one(INSTANCE)
    assert many["instanceType"] == pricing.instance_type_for(64) != pricing.instance_type_for(4)


def test_instance_type_wins_over_nprocs(program, base):
    assert program({**base, "crimpl:instanceType": "m6a.xlarge"}).one(INSTANCE)["instanceType"] == "m6a.xlarge"


def test_image_is_the_newest_canonical_ubuntu_lts(program, base):
    run = program(base)
    assert run.one(INSTANCE)["ami"] == NEWEST_UBUNTU_LTS
    lookup = run.invoked("aws:ec2/getAmi:getAmi")[0]
    assert lookup["owners"] == [CANONICAL] and lookup["mostRecent"] is True
    # A looked-up image moves with every Canonical build: that must not replace the server.
    assert run.options["server"]["ignore_changes"] == ["ami"] + REPLACED_HOST_KEY_TAGS


#: crimpl replaces the user-data host key after the first connection and records the new key
#: in these tags; `pulumi up` after a refresh must not put the user-data key back.
#: `crimpl autostop` likewise records the watchdog it installed in a tag.
REPLACED_HOST_KEY_TAGS = ['tags["crimpl:host-key"]', 'tags["crimpl:host-key-rotated"]', 'tags["crimpl:autostop"]',
                          'tagsAll["crimpl:host-key"]', 'tagsAll["crimpl:host-key-rotated"]',
                          'tagsAll["crimpl:autostop"]']


def canonical_server_images(images):
    """What EC2's DescribeImages answers crimpl.ec2.newest_ubuntu_lts's query with."""
    filters = [{"name": "name", "values": [UBUNTU_NAME_PATTERN]}, {"name": "architecture", "values": ["x86_64"]},
               {"name": "state", "values": ["available"]}]
    return [{"ImageId": i["ami_id"], "Name": i["name"], "CreationDate": i["creation_date"]}
            for i in matching_images(images, [UBUNTU_OWNER], filters)]


REBUILT_JAMMY = _ami("ami-0b7c1d2e3f4a5b6c7", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20250101",
                     "2025-01-01T00:00:00.000Z")
NEW_LTS = _ami("ami-0f1e2d3c4b5a69788", "ubuntu/images/hvm-ssd-gp3/ubuntu-resolute-26.04-amd64-server-20260423",
               "2026-04-23T00:00:00.000Z")


@pytest.mark.parametrize("images, expected", [
    (AMIS, NEWEST_UBUNTU_LTS),
    # An older LTS rebuilt after the newest one: the newest release still wins.
    (AMIS + [REBUILT_JAMMY], NEWEST_UBUNTU_LTS),
    (AMIS + [REBUILT_JAMMY, NEW_LTS], NEW_LTS["ami_id"]),
])
def test_image_choice_matches_the_boto3_path(program, base, images, expected):
    assert ec2.newest_lts_image(canonical_server_images(images)) == expected
    assert program(base, images=images).one(INSTANCE)["ami"] == expected


def test_image_id_is_used_without_a_lookup(program, base):
    run = program({**base, "crimpl:imageId": "ami-0123456789abcdef0"})
    assert run.one(INSTANCE)["ami"] == "ami-0123456789abcdef0"
    assert run.invoked("aws:ec2/getAmi:getAmi") == []
    # A new imageId is a new server.
    assert run.options["server"]["ignore_changes"] == REPLACED_HOST_KEY_TAGS


def test_public_key_of_key_file_is_imported_as_a_key_pair(program, base, key_file):
    run = program(base)
    pair = run.one(KEY_PAIR)
    assert pair["keyName"] == "crimpl-crimpl-dev"
    assert pair["publicKey"] == " ".join(key_file.with_suffix(".pub").read_text().split()[:2])
    assert run.one(INSTANCE)["keyName"] == "crimpl-crimpl-dev"
    assert run.options["key-pair"]["delete_before_replace"] is True


def test_existing_key_name_is_used_and_nothing_imported(program, base):
    run = program({**base, "crimpl:keyName": "team-key"})
    assert run.all(KEY_PAIR) == []
    assert run.one(INSTANCE)["keyName"] == "team-key"


# ---------------------------------------------------------------------------
# Security group


def test_security_group_allows_ssh_only_from_the_given_address(program, base):
    run = program(base)
    group = run.one(SECURITY_GROUP)
    assert group["name"] == "crimpl-crimpl-dev-ssh"
    rule, between_nodes = group["ingress"]
    assert (rule["protocol"], int(rule["fromPort"]), int(rule["toPort"])) == ("tcp", 22, 22)
    assert rule["cidrBlocks"] == [CALLER]
    assert "ipv6CidrBlocks" not in rule or not rule["ipv6CidrBlocks"]
    # The one other rule: every protocol, from the members of the group (the nodes) only.
    assert (between_nodes["protocol"], between_nodes["self"]) == ("-1", True)
    assert not between_nodes.get("cidrBlocks") and not between_nodes.get("ipv6CidrBlocks")
    assert not between_nodes.get("securityGroups") and not between_nodes.get("prefixListIds")
    assert [e["protocol"] for e in group["egress"]] == ["-1"]
    assert run.one(INSTANCE)["vpcSecurityGroupIds"] == [MOCK_GROUP_ID]
    assert "vpcId" not in group  # the default VPC, as the boto3 path


def test_security_group_takes_the_stack_cidr_list(program, base):
    cidrs = ["203.0.113.0/24", "192.0.2.15/32"]
    group = program({**base, "crimpl:sshCidrs": cidrs}).one(SECURITY_GROUP)
    assert group["ingress"][0]["cidrBlocks"] == cidrs
    ingress_cidrs = [c for rule in group["ingress"] for c in rule.get("cidrBlocks", [])]
    assert "0.0.0.0/0" not in ingress_cidrs and "::/0" not in ingress_cidrs


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_ssh_from_the_whole_internet_is_refused(program, base, cidr):
    with pytest.raises(pulumi.RunError, match=r"crimpl:sshCidrs: .* whole internet"):
        program({**base, "crimpl:sshCidrs": ["203.0.113.0/24", cidr]})


@pytest.mark.parametrize("cidrs", [["0.0.0.0/1", "128.0.0.0/1"], ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2",
                                                                  "192.0.0.0/2"], ["10.0.0.0/7"], ["2001:db8::/31"]])
def test_ssh_cidrs_that_together_cover_too_much_are_refused(program, base, cidrs):
    with pytest.raises(pulumi.RunError, match=r"Pulumi.dev.yaml: crimpl:sshCidrs: "):
        program({**base, "crimpl:sshCidrs": cidrs})


def test_ipv6_network_goes_in_the_ipv6_cidr_blocks(program, base):
    group = program({**base, "crimpl:sshCidrs": ["2001:db8:1::/48", CALLER]}).one(SECURITY_GROUP)
    rule, _between_nodes = group["ingress"]
    assert rule["cidrBlocks"] == [CALLER]
    assert rule["ipv6CidrBlocks"] == ["2001:db8:1::/48"]


def test_no_ssh_cidrs_and_no_group_is_an_error_not_an_open_port(program, base):
    del base["crimpl:sshCidrs"]
    with pytest.raises(pulumi.RunError, match=r"crimpl:sshCidrs is not set"):
        program(base)


def test_existing_security_group_is_used_and_none_created(program, base):
    del base["crimpl:sshCidrs"]
    run = program({**base, "crimpl:securityGroupId": "sg-0fedcba987654321f"})
    assert run.all(SECURITY_GROUP) == []
    assert run.one(INSTANCE)["vpcSecurityGroupIds"] == ["sg-0fedcba987654321f"]


def test_subnet_sets_the_instance_subnet_and_the_group_vpc(program, base):
    run = program({**base, "crimpl:subnetId": "subnet-0123456789abcdef0"})
    assert run.one(INSTANCE)["subnetId"] == "subnet-0123456789abcdef0"
    assert run.one(SECURITY_GROUP)["vpcId"] == MOCK_VPC_ID


# ---------------------------------------------------------------------------
# Volume, spot, tags, user data, exports


def test_root_volume_is_gp3_of_the_given_size_and_deleted_with_the_server(program, base):
    default = program(base).one(INSTANCE)["rootBlockDevice"]
    assert (int(default["volumeSize"]), default["volumeType"], default["deleteOnTermination"]) == (20, "gp3", True)
    assert int(program({**base, "crimpl:volumeSize": 200}).one(INSTANCE)["rootBlockDevice"]["volumeSize"]) == 200


def test_spot_is_persistent_and_stops_on_interruption(program, base):
    assert "instanceMarketOptions" not in program(base).one(INSTANCE)
    market = program({**base, "crimpl:spot": True}).one(INSTANCE)["instanceMarketOptions"]
    assert market == {"marketType": "spot", "spotOptions": {
        "instanceInterruptionBehavior": "stop", "spotInstanceType": "persistent"}}


def test_instance_hardening(program, base):
    instance = program(base).one(INSTANCE)
    assert instance["metadataOptions"] == {"httpTokens": "required", "httpEndpoint": "enabled"}
    assert instance["instanceInitiatedShutdownBehavior"] == "stop"


def test_tags_name_the_stack_and_carry_user_tags(program, base):
    run = program({**base, "crimpl:tags": {"team": "physics", "cost-center": 42}}, stack="gpu")
    instance = run.one(INSTANCE)
    tags = instance["tags"]
    assert tags["crimpl:managed"] == "true"
    assert tags["crimpl:name"] == tags["Name"] == "crimpl-gpu"
    assert tags["crimpl:version"] == __version__
    assert tags["crimpl:user"] == "ubuntu"
    assert (tags["team"], tags["cost-center"]) == ("physics", "42")
    assert tags["crimpl:host-key"] == HOST_KEY[1]
    assert tags["crimpl:node-rank"] == "0"
    assert instance["volumeTags"] == tags
    # The key pair and group carry the same tags, without the node's host key and rank.
    others = {k: v for k, v in tags.items() if k not in ("crimpl:host-key", "crimpl:node-rank")}
    assert run.one(KEY_PAIR)["tags"] == run.one(SECURITY_GROUP)["tags"] == others


def test_server_name_key_overrides_project_and_stack(program, base):
    run = program({**base, "crimpl:serverName": "analysis-1"})
    assert run.one(INSTANCE)["tags"]["crimpl:name"] == "analysis-1"
    assert run.exports["serverName"] == "analysis-1"


def test_user_data_carries_the_host_key_and_is_secret(program, base):
    user_data = unsecret(program(base).one(INSTANCE)["userData"])
    assert user_data.startswith("#cloud-config\n")
    assert host_key_from_user_data(user_data) == (HOST_KEY[0].strip() + "\n", HOST_KEY[1])


def test_exports(program, base):
    assert program(base).exports == {
        "instanceId": "i-0123456789abcdef0", "publicIp": "203.0.113.10", "privateIp": "10.0.0.5",
        "instanceIds": ["i-0123456789abcdef0"], "privateIps": ["10.0.0.5"],
        "username": "ubuntu", "serverName": "crimpl-dev",
    }
    assert program({**base, "crimpl:username": "admin"}).exports["username"] == "admin"


def test_saved_config_supplies_account_fields(program, key_file):
    AWSEC2_Config(KeyFile=str(key_file), SubnetId="subnet-0aaaaaaaaaaaaaaaa", tags={"owner": "lab"}).save("acct")
    run = program({"crimpl:config": "acct", "crimpl:nprocs": 2, "crimpl:sshCidrs": [CALLER]})
    instance = run.one(INSTANCE)
    assert instance["subnetId"] == "subnet-0aaaaaaaaaaaaaaaa"
    assert instance["tags"]["owner"] == "lab"


# ---------------------------------------------------------------------------
# Errors


def test_host_key_must_be_set(program, base):
    with pytest.raises(pulumi.RunError, match=r"crimpl:hostKey is not set"):
        program(base, host_key=None)


def test_host_key_must_be_a_secret(program, base):
    with pytest.raises(pulumi.RunError, match=r"crimpl:hostKey must be a secret"):
        program(base, secret_keys=())


@pytest.mark.parametrize("key, value", [
    ("crimpl:volumeSize", "big"),
    ("crimpl:volumeSize", "4"),
    ("crimpl:nprocs", "many"),
    ("crimpl:spot", "maybe"),
    ("crimpl:tags", "team=physics"),
    ("crimpl:tags", ["not", "a", "mapping"]),
    ("crimpl:sshCidrs", ["not-a-cidr"]),
    ("crimpl:imageId", "ubuntu"),
    ("crimpl:volumesize", 30),
    ("crimpl:sshTimeout", "nan"),
    ("crimpl:sshTimeout", "-inf"),
    ("crimpl:nprocs", 0),
    ("crimpl:nodes", 0),
    ("crimpl:nodes", -1),
    ("crimpl:nodes", "x"),
    ("crimpl:nodes", "1.5"),
    ("crimpl:nodes", "true"),
    ("crimpl:nodes", 65),
    ("crimpl:placement", "spread"),
])
def test_wrong_type_or_unknown_key_is_named(program, base, key, value):
    with pytest.raises(pulumi.RunError) as error:
        program({**base, key: value})
    assert key in str(error.value)
    assert "Pulumi.dev.yaml" in str(error.value)


# ---------------------------------------------------------------------------
# Parity: the boto3 rendering and the Pulumi rendering of one stack


def boto3_instance(params):
    ebs = params["BlockDeviceMappings"][0]["Ebs"]
    tags = {s["ResourceType"]: {t["Key"]: t["Value"] for t in s["Tags"]} for s in params["TagSpecifications"]}
    market = params.get("InstanceMarketOptions")
    return {
        "count": (params["MinCount"], params["MaxCount"]),
        "ami": params["ImageId"],
        "type": params["InstanceType"],
        "key": params["KeyName"],
        "subnet": params.get("SubnetId"),
        "groups": params.get("SecurityGroupIds"),
        "user_data": params["UserData"],
        "volume": (ebs["VolumeSize"], ebs["VolumeType"], ebs["DeleteOnTermination"]),
        "shutdown": params["InstanceInitiatedShutdownBehavior"],
        "metadata": params["MetadataOptions"],
        "tags": tags["instance"],
        "volume_tags": tags["volume"],
        "spot": market and (market["MarketType"], market["SpotOptions"]),
        "placement": params.get("Placement", {}).get("GroupName"),
    }


def pulumi_instance(inputs):
    root = inputs["rootBlockDevice"]
    market = inputs.get("instanceMarketOptions")
    return {
        "count": (1, 1),  # one aws.ec2.Instance is one instance
        "ami": inputs["ami"],
        "type": inputs["instanceType"],
        "key": inputs["keyName"],
        "subnet": inputs.get("subnetId"),
        "groups": inputs["vpcSecurityGroupIds"],
        "user_data": unsecret(inputs["userData"]),
        "volume": (int(root["volumeSize"]), root["volumeType"], root["deleteOnTermination"]),
        "shutdown": inputs["instanceInitiatedShutdownBehavior"],
        "metadata": {"HttpTokens": inputs["metadataOptions"]["httpTokens"],
                     "HttpEndpoint": inputs["metadataOptions"]["httpEndpoint"]},
        "tags": inputs["tags"],
        "volume_tags": inputs["volumeTags"],
        "spot": market and (market["marketType"], {
            "SpotInstanceType": market["spotOptions"]["spotInstanceType"],
            "InstanceInterruptionBehavior": market["spotOptions"]["instanceInterruptionBehavior"],
        }),
        "placement": inputs.get("placementGroup"),
    }


def pulumi_permissions(ingress, group_id=MOCK_GROUP_ID):
    """The Pulumi group's rules as boto3 writes them: the SSH rule, then the rule between the nodes."""
    ssh, between_nodes = ingress
    assert (between_nodes["protocol"], between_nodes["self"]) == ("-1", True)
    assert set(between_nodes) <= {"protocol", "fromPort", "toPort", "self", "description"}
    return [{
        "IpProtocol": ssh["protocol"], "FromPort": int(ssh["fromPort"]), "ToPort": int(ssh["toPort"]),
        "IpRanges": [{"CidrIp": c, "Description": ssh["description"]} for c in ssh.get("cidrBlocks", [])],
        "Ipv6Ranges": [{"CidrIpv6": c, "Description": ssh["description"]}
                       for c in ssh.get("ipv6CidrBlocks", [])],
    }, {
        "IpProtocol": "-1",
        "UserIdGroupPairs": [{"GroupId": group_id, "Description": between_nodes["description"]}],
    }]


PARITY_STACKS = {
    "defaults": {"crimpl:nprocs": 4, "crimpl:sshCidrs": [CALLER]},
    "spot-tags-subnet": {
        "crimpl:nprocs": 16, "crimpl:spot": True, "crimpl:volumeSize": 120,
        "crimpl:tags": {"team": "physics"}, "crimpl:subnetId": "subnet-0123456789abcdef0",
        "crimpl:sshCidrs": ["203.0.113.0/24", "192.0.2.15/32", "2001:db8:7::/48"], "crimpl:serverName": "big-run",
    },
    "autostop-lifetime-terminate": {
        "crimpl:nprocs": 2, "crimpl:sshCidrs": [CALLER], "crimpl:autostop": "30m", "crimpl:maxLifetime": "12h",
        "crimpl:autostopDown": True, "crimpl:remoteDir": "work/crimpl",
    },
    "existing-everything": {
        "crimpl:instanceType": "c7i.2xlarge", "crimpl:keyName": "team-key",
        "crimpl:securityGroupId": "sg-0fedcba987654321f", "crimpl:imageId": "ami-0123456789abcdef0",
        "crimpl:username": "admin",
    },
    "three-nodes-in-a-cluster-placement-group": {
        "crimpl:nprocs": 8, "crimpl:nodes": 3, "crimpl:placement": "cluster", "crimpl:sshCidrs": [CALLER],
        "crimpl:subnetId": "subnet-0123456789abcdef0", "crimpl:tags": {"team": "physics"},
    },
    "three-nodes-existing-group": {
        "crimpl:nprocs": 2, "crimpl:nodes": 3, "crimpl:securityGroupId": "sg-0fedcba987654321f",
    },
}


@pytest.mark.parametrize("name", PARITY_STACKS)
def test_boto3_and_pulumi_create_the_same_instance(program, key_file, tmp_path, name):
    config = {"aws:region": "us-east-1", "crimpl:keyFile": str(key_file), **PARITY_STACKS[name]}
    (tmp_path / "Pulumi.dev.yaml").write_text(yaml.safe_dump({"config": config}))
    spec = spec_for_stack(read_stack("dev", tmp_path), host_key=HOST_KEY)

    run = program(config)
    image_id = spec.image_id or NEWEST_UBUNTU_LTS  # what newest_ubuntu_lts finds in AMIS
    group_id = spec.security_group_id or MOCK_GROUP_ID
    declared = {name: inputs for typ, name, inputs in run.mocks.resources if typ == INSTANCE}
    # Pulumi registers resources concurrently: their order is not the program's.
    names = ["server", *(f"server-{rank}" for rank in range(1, spec.nnodes))]
    assert sorted(declared) == names
    for node, inputs in zip(spec.nodes, (declared[name] for name in names)):
        params = ec2.run_instances_params(node, image_id, spec.key_pair_name, [group_id])
        assert pulumi_instance(inputs) == boto3_instance(params)
        assert inputs["tags"]["crimpl:node-rank"] == str(node.rank)
    if spec.placement:
        group = run.one(PLACEMENT_GROUP)
        params = ec2.placement_group_params(spec)
        assert (group["name"], group["strategy"]) == (params["GroupName"], params["Strategy"])
        assert group["tags"] == {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
    else:
        assert run.all(PLACEMENT_GROUP) == []

    if spec.security_group_id:
        assert run.all(SECURITY_GROUP) == []
    else:
        group = run.one(SECURITY_GROUP)
        assert pulumi_permissions(group["ingress"]) == [ec2.ssh_permission(spec.ssh_cidrs),
                                                        ec2.self_permission(MOCK_GROUP_ID)]
        assert group["name"] == spec.security_group_name
        assert group["tags"] == {t["Key"]: t["Value"] for t in ec2._crimpl_only_tags(spec)}
    if spec.key_name:
        assert run.all(KEY_PAIR) == []
    else:
        pair = run.one(KEY_PAIR)
        assert (pair["keyName"], pair["publicKey"]) == (spec.key_pair_name, spec.public_key)
        assert pair["tags"] == {t["Key"]: t["Value"] for t in ec2._crimpl_only_tags(spec)}


def test_security_group_matches_the_one_the_boto3_path_creates(program, key_file, aws, tmp_path):
    """Against moto_server: same name, description and rule; a description AWS accepts."""
    config = {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:sshCidrs": [CALLER, "2001:db8:1::/48"]}
    (tmp_path / "Pulumi.dev.yaml").write_text(yaml.safe_dump({"config": config}))
    spec = spec_for_stack(read_stack("dev", tmp_path), host_key=HOST_KEY)
    client = ec2.client()
    group_id = ec2.ensure_security_group(client, spec, spec.ssh_cidrs)
    [created] = client.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]

    group = program(config).one(SECURITY_GROUP)
    assert (group["name"], group["description"]) == (created["GroupName"], created["Description"])
    # CreateSecurityGroup's allowed characters (no apostrophe).
    assert re.fullmatch(r"[A-Za-z0-9 ._\-:/()#,@\[\]+=&;{}!$*]+", group["description"])
    ssh, between_nodes = sorted(created["IpPermissions"], key=lambda rule: rule["IpProtocol"] != "tcp")
    assert pulumi_permissions(group["ingress"], group_id) == [
        {key: ssh[key] for key in ("IpProtocol", "FromPort", "ToPort", "IpRanges", "Ipv6Ranges")},
        {"IpProtocol": between_nodes["IpProtocol"],
         "UserIdGroupPairs": [{k: v for k, v in pair.items() if k != "UserId"}
                              for pair in between_nodes["UserIdGroupPairs"]]},
    ]
    assert between_nodes["IpRanges"] == between_nodes["Ipv6Ranges"] == between_nodes["PrefixListIds"] == []


def test_autostop_and_lifetime_are_in_the_user_data_tags_and_shutdown_behaviour(program, base):
    inputs = program({**base, "crimpl:autostop": "45m", "crimpl:maxLifetime": "1d",
                      "crimpl:autostopDown": True}).one(INSTANCE)
    user_data = yaml.safe_load(unsecret(inputs["userData"]))
    files = {f["path"]: f["content"] for f in user_data["write_files"]}
    assert "AUTOSTOP=2700\n" in files["/home/ubuntu/crimpl/watchdog/autostop.conf"]
    assert files["/home/ubuntu/crimpl/watchdog/lifetime.conf"] == "LIFETIME=86400\n"
    assert inputs["tags"]["crimpl:autostop"] == "45m (terminate)"
    assert inputs["tags"]["crimpl:max-lifetime"] == "1d (terminate)"
    assert inputs["instanceInitiatedShutdownBehavior"] == "terminate"


@pytest.mark.parametrize("key, value", [("crimpl:autostop", "0"), ("crimpl:autostop", "-5m"),
                                        ("crimpl:maxLifetime", "abc")])
def test_a_bad_duration_stops_the_program_with_one_line(program, base, key, value):
    with pytest.raises(pulumi.RunError, match=f"{key} must be a duration") as caught:
        program({**base, key: value})
    assert "\n" not in str(caught.value).strip()


# ---------------------------------------------------------------------------
# Nodes (crimpl:nodes) and the placement group (crimpl:placement)


def test_each_node_is_an_instance_named_by_rank_with_its_own_host_key(program, base):
    run = program({**base, "crimpl:nodes": 3})
    declared = {name: inputs for typ, name, inputs in run.mocks.resources if typ == INSTANCE}
    # Pulumi registers resources concurrently: their order is not the program's.
    names = ["server", "server-1", "server-2"]
    assert sorted(declared) == names
    keys = []
    for rank, inputs in enumerate(declared[name] for name in names):
        private, public = host_key_from_user_data(unsecret(inputs["userData"]))
        assert inputs["tags"]["crimpl:host-key"] == public == public_line_of(private)
        assert inputs["tags"]["crimpl:node-rank"] == inputs["volumeTags"]["crimpl:node-rank"] == str(rank)
        assert inputs["tags"]["crimpl:name"] == "crimpl-dev"
        keys.append(public)
    assert keys[0] == HOST_KEY[1] and len(set(keys)) == 3
    # Every node ignores the same tag changes (rotated host keys, autostop) as the first.
    assert run.options["server-1"]["ignore_changes"] == run.options["server"]["ignore_changes"]
    assert run.exports["instanceIds"] == [f"i-0123456789abcdef{rank}" for rank in range(3)]
    assert run.exports["privateIps"] == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
    assert run.exports["instanceId"] == "i-0123456789abcdef0"
    # One key pair and one group for all the nodes.
    assert len(run.all(KEY_PAIR)) == len(run.all(SECURITY_GROUP)) == 1
    assert all(i["vpcSecurityGroupIds"] == [MOCK_GROUP_ID] for i in declared.values())


def test_the_nodes_user_data_is_the_same_from_one_run_to_the_next(program, base):
    def user_data():
        return [unsecret(i["userData"]) for i in program({**base, "crimpl:nodes": 3}).all(INSTANCE)]

    first = user_data()
    assert first == user_data()  # else every `pulumi up` would rewrite the nodes' user data
    assert len(set(first)) == 3


def test_placement_cluster_puts_every_node_in_one_placement_group(program, base):
    run = program({**base, "crimpl:nodes": 2, "crimpl:placement": "cluster"})
    group = run.one(PLACEMENT_GROUP)
    assert (group["name"], group["strategy"]) == ("crimpl-crimpl-dev-cluster", "cluster")
    assert group["tags"]["crimpl:name"] == "crimpl-dev" and "crimpl:node-rank" not in group["tags"]
    assert [i["placementGroup"] for i in run.all(INSTANCE)] == ["crimpl-crimpl-dev-cluster"] * 2
    assert all(i["tags"]["crimpl:placement-group"] == "crimpl-crimpl-dev-cluster" for i in run.all(INSTANCE))


def test_no_placement_key_no_placement_group(program, base):
    run = program({**base, "crimpl:nodes": 2})
    assert run.all(PLACEMENT_GROUP) == []
    assert all("placementGroup" not in i for i in run.all(INSTANCE))
