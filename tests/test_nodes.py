"""Servers of several nodes (issue 11): launch, ranks, the security group, up with another N, lifecycle.

Against moto_server through the ``aws``/``ec2`` fixtures, in a VPC of loopback addresses
(``cluster_network``), so the nodes' private IPs are 127.<k>.1.x.
"""

import ipaddress

import pytest
import yaml
from cli_helper import run_cli
from sandbox import NEWEST_UBUNTU_LTS, SSH_CIDRS, instance_host_key

from crimpl import AWSEC2, AWSEC2_Config, AWSError, ConfigError, HostKeyMismatchError, list_instances
from crimpl import ec2 as crimpl_ec2
from crimpl.config import build_spec
from crimpl.hostkeys import pinned_key, public_line_of
from crimpl.server import destroy_server


@pytest.fixture
def cluster_config(key_file, cluster_network):
    return AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, SubnetId=cluster_network.subnet_id)


def live(ec2, name):
    filters = [{"Name": "tag:crimpl:name", "Values": [name]},
               {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]]


def tags_of(instance):
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def ranks_and_ids(ec2, name):
    return sorted((int(tags_of(i)["crimpl:node-rank"]), i["InstanceId"]) for i in live(ec2, name))


# -- launch -------------------------------------------------------------------------------


def test_a_server_of_three_nodes_is_three_instances_tagged_rank_0_to_2(ec2, cluster_config, cluster_network):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="trio")

    assert (server.rank, server.nnodes) == (0, 3)
    nodes = server.nodes
    assert [node.rank for node in nodes] == [0, 1, 2]
    assert nodes[0].instanceId == server.instanceId
    assert [(r, i) for r, i in ranks_and_ids(ec2, "trio")] == [(n.rank, n.instanceId) for n in nodes]
    for node in nodes:
        tags = node.tags
        assert (tags["crimpl:name"], tags["crimpl:managed"]) == ("trio", "true")
        assert node.state == "running"
    ips = [node.private_ip for node in nodes]
    assert len(set(ips)) == 3
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(cluster_network.cidr) for ip in ips)


def test_each_node_has_its_own_host_key_pinned_by_its_instance_id(aws, ec2, cluster_config):
    nodes = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="keys").nodes

    publics = []
    for node in nodes:
        private = instance_host_key(node.instanceId, aws.environ())  # what cloud-init installs
        public = public_line_of(private)
        assert pinned_key(node.instanceId).get_base64() == public.split()[1]
        assert node.tags["crimpl:host-key"] == public
        publics.append(public)
    assert len(set(publics)) == 3


def test_the_group_lets_ssh_in_from_the_owner_and_everything_from_the_nodes_only(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=2, server_name="duo")

    groups = {g["GroupId"] for node in server.nodes for g in node.describe()["SecurityGroups"]}
    [group_id] = groups  # one group for every node
    [group] = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    rules = sorted(group["IpPermissions"], key=lambda rule: rule["IpProtocol"])
    assert len(rules) == 2
    between_nodes, ssh = rules
    assert (between_nodes["IpProtocol"], [p["GroupId"] for p in between_nodes["UserIdGroupPairs"]]) == \
        ("-1", [group_id])
    assert between_nodes["IpRanges"] == between_nodes["Ipv6Ranges"] == between_nodes["PrefixListIds"] == []
    assert (ssh["IpProtocol"], ssh["FromPort"], ssh["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == SSH_CIDRS and ssh["UserIdGroupPairs"] == []


def test_an_existing_group_with_exactly_the_rule_between_nodes_is_adopted(ec2, cluster_config, cluster_network):
    group = ec2.create_security_group(GroupName="crimpl-adopt-ssh", Description="pre-existing",
                                      VpcId=cluster_network.vpc_id)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[crimpl_ec2.self_permission(group)])

    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=2, server_name="adopt")

    assert {g["GroupId"] for g in server.describe()["SecurityGroups"]} == {group}
    [found] = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    assert sorted(rule["IpProtocol"] for rule in found["IpPermissions"]) == ["-1", "tcp"]


@pytest.mark.parametrize("permission", [
    {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "OTHER"}]},
    {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [{"GroupId": "SELF"}]},
    {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "SELF"}], "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
], ids=["everything-from-another-group", "ports-from-itself-not-the-crimpl-rule", "itself-and-a-network"])
def test_an_existing_group_that_lets_in_more_than_ssh_and_its_nodes_is_refused(ec2, cluster_config,
                                                                                cluster_network, permission):
    other = ec2.create_security_group(GroupName="someone-else", Description="x",
                                      VpcId=cluster_network.vpc_id)["GroupId"]
    group = ec2.create_security_group(GroupName="crimpl-wide-ssh", Description="pre-existing",
                                      VpcId=cluster_network.vpc_id)["GroupId"]
    for pair in permission.get("UserIdGroupPairs", []):
        pair["GroupId"] = {"OTHER": other, "SELF": group}[pair["GroupId"]]
    ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[permission])

    with pytest.raises(ConfigError) as caught:
        AWSEC2.new(cluster_config, nprocs=2, nnodes=2, server_name="wide")

    message = str(caught.value)
    assert "\n" not in message and group in message and "lets in more than SSH" in message
    assert live(ec2, "wide") == []


def test_each_rank_is_launched_with_its_own_client_token():
    at = crimpl_ec2.datetime(2026, 11, 30, 9, tzinfo=crimpl_ec2.timezone.utc)
    tokens = {crimpl_ec2.client_token("box", [], rank=rank, now=at) for rank in range(4)}
    assert len(tokens) == 4
    assert crimpl_ec2.client_token("box", [], now=at) == crimpl_ec2.client_token("box", [], rank=0, now=at)


# -- settle: duplicates of one rank, never other ranks ------------------------------------------


def duplicate_of(ec2, server, rank):
    """Launch another instance carrying ``server``'s name and ``rank``, as a concurrent `up` would."""
    tags = {**server.tags, "crimpl:node-rank": str(rank)}
    return ec2.run_instances(ImageId=NEWEST_UBUNTU_LTS, InstanceType="c6a.large", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                 {"Key": k, "Value": v} for k, v in tags.items()]}])["Instances"][0]["InstanceId"]


def test_settle_terminates_a_duplicate_of_one_rank_and_leaves_the_other_ranks(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="dups")
    before = [(n.rank, n.instanceId) for n in server.nodes]
    extra = duplicate_of(ec2, server, 1)
    # Every caller keeps the first launched of the rank, ties (EC2 reports whole seconds) to the lower id.
    pair = [crimpl_ec2.describe(ec2, i) for i in (before[1][1], extra)]
    first, second = sorted(pair, key=lambda i: (i["LaunchTime"], i["InstanceId"]))

    for rank in (0, 2):
        assert crimpl_ec2.settle(ec2, "dups", rank=rank)[0]["InstanceId"] == before[rank][1]
    assert ranks_and_ids(ec2, "dups") == sorted([*before, (1, extra)])  # other ranks leave rank 1 alone
    kept, _ = crimpl_ec2.settle(ec2, "dups", rank=1)

    assert kept["InstanceId"] == first["InstanceId"]
    assert ranks_and_ids(ec2, "dups") == [before[0], (1, first["InstanceId"]), before[2]]
    assert crimpl_ec2.describe(ec2, second["InstanceId"])["State"]["Name"] in ("shutting-down", "terminated")


# -- ranks are tags, not launch order -------------------------------------------------------------


def test_ranks_are_kept_across_stop_and_start(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="steady")
    before = [(n.rank, n.instanceId, n.private_ip) for n in server.nodes]

    server.stop()
    assert [n.state for n in server.nodes] == ["stopped"] * 3
    server.start()

    again = AWSEC2(server_name="steady", config=cluster_config)
    assert [(n.rank, n.instanceId, n.private_ip) for n in again.nodes] == before
    assert [n.state for n in again.nodes] == ["running"] * 3


def test_a_replaced_node_keeps_its_rank_though_it_was_launched_last(ec2, cluster_config):
    spec = build_spec(AWSEC2_Config(**{**cluster_config.to_dict(), "nnodes": 3}), nprocs=2, server_name="heal")
    server, _ = AWSEC2.up(spec, cluster_config)
    lost = server.nodes[1]
    lost.terminate()  # a node object ends its own node only

    assert [n.rank for n in server.nodes] == [0, 2]
    AWSEC2.up(spec, cluster_config)

    nodes = server.nodes
    assert [n.rank for n in nodes] == [0, 1, 2]
    assert nodes[1].instanceId != lost.instanceId
    # Launched after rank 2, listed between rank 0 and rank 2: order is by the rank tag.
    assert nodes[1].describe()["LaunchTime"] >= nodes[2].describe()["LaunchTime"]


def test_an_instance_without_a_rank_tag_is_rank_0_and_up_adds_the_others(ec2, cluster_config):
    old_spec = build_spec(cluster_config, nprocs=2, server_name="legacy")
    old, _ = AWSEC2.up(old_spec, cluster_config)
    ec2.delete_tags(Resources=[old.instanceId], Tags=[{"Key": "crimpl:node-rank"}])  # as an older crimpl left it
    assert "crimpl:node-rank" not in old.tags and old.rank == 0

    spec = build_spec(AWSEC2_Config(**{**cluster_config.to_dict(), "nnodes": 2}), nprocs=2, server_name="legacy")
    server, launched = AWSEC2.up(spec, cluster_config)

    assert (server.instanceId, launched) == (old.instanceId, True)
    assert [(n.rank, n.instanceId == old.instanceId) for n in server.nodes] == [(0, True), (1, False)]


# -- up with another N ----------------------------------------------------------------------------


def spec_of(config, nnodes, name):
    return build_spec(AWSEC2_Config(**{**config.to_dict(), "nnodes": nnodes}), nprocs=2, server_name=name)


def test_up_with_more_nodes_launches_only_the_missing_ranks(ec2, cluster_config, caplog):
    AWSEC2.up(spec_of(cluster_config, 2, "grow"), cluster_config)
    before = ranks_and_ids(ec2, "grow")

    server, launched = AWSEC2.up(spec_of(cluster_config, 4, "grow"), cluster_config)

    after = ranks_and_ids(ec2, "grow")
    assert launched and after[:2] == before and [r for r, _ in after] == [0, 1, 2, 3]
    assert server.instanceId == before[0][1]
    assert "grow: 2 of 4 nodes are up: launching node(s) 2, 3" in caplog.text


def test_up_with_fewer_nodes_terminates_the_highest_ranks_first_and_says_so(ec2, cluster_config, caplog):
    AWSEC2.up(spec_of(cluster_config, 4, "shrink"), cluster_config)
    before = ranks_and_ids(ec2, "shrink")

    server, launched = AWSEC2.up(spec_of(cluster_config, 2, "shrink"), cluster_config)

    assert not launched and ranks_and_ids(ec2, "shrink") == before[:2]
    said = caplog.text
    assert f"2 node(s) wanted: terminating node 3 ({before[3][1]}), node 2 ({before[2][1]})" in said
    for _, instance_id in before[2:]:
        assert crimpl_ec2.describe(ec2, instance_id)["State"]["Name"] == "terminated"
        assert pinned_key(instance_id) is None
    assert server.nnodes == 2


def test_up_with_the_same_nodes_changes_nothing(ec2, cluster_config):
    first, _ = AWSEC2.up(spec_of(cluster_config, 3, "same"), cluster_config)
    before = ranks_and_ids(ec2, "same")

    server, launched = AWSEC2.up(spec_of(cluster_config, 3, "same"), cluster_config)

    assert (server.instanceId, launched) == (first.instanceId, False)
    assert ranks_and_ids(ec2, "same") == before


# -- lifecycle: rank 0 acts on all, a node object on one -----------------------------------------------


def test_a_node_object_stops_and_starts_its_own_node_only(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="one")

    server.nodes[2].stop()
    assert [n.state for n in server.nodes] == ["running", "running", "stopped"]
    server.nodes[0].stop()  # rank 0 through .nodes: that node only
    assert [n.state for n in server.nodes] == ["stopped", "running", "stopped"]
    server.start()  # rank 0's own object: every node
    assert [n.state for n in server.nodes] == ["running"] * 3


def test_terminating_rank_0_ends_every_node_and_what_crimpl_created(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="gone")
    ids = [n.instanceId for n in server.nodes]

    server.terminate()

    assert all(crimpl_ec2.describe(ec2, i)["State"]["Name"] == "terminated" for i in ids)
    assert all(pinned_key(i) is None for i in ids)
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["crimpl-gone-ssh"]}])
    assert groups["SecurityGroups"] == []
    assert ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["crimpl-gone"]}])["KeyPairs"] == []


def test_destroy_ends_every_node(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="wipe")
    ids = sorted(n.instanceId for n in server.nodes)

    report = destroy_server("wipe")

    assert sorted(report.terminated) == ids and sorted(report.unpinned) == ids
    assert live(ec2, "wipe") == []


def test_list_instances_shows_each_nodes_rank_and_private_ip(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=2, server_name="listed")

    rows = sorted((r.rank, r.instance_id, r.private_ip) for r in list_instances() if r.name == "listed")
    assert rows == [(n.rank, n.instanceId, n.private_ip) for n in server.nodes]


def test_attaching_by_name_gives_rank_0_even_when_it_was_not_launched_first(ec2, cluster_config):
    spec = spec_of(cluster_config, 2, "zero")
    server, _ = AWSEC2.up(spec, cluster_config)
    server.nodes[0].terminate()
    AWSEC2.up(spec, cluster_config)  # rank 0 again, now the newest instance of the name

    attached = AWSEC2(server_name="zero", config=cluster_config)
    assert attached.rank == 0 and attached.instanceId != server.instanceId


# -- placement group -------------------------------------------------------------------------------


def test_placement_group_parameters_and_the_nodes_launch_in_it(key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), nnodes=2, placement="cluster", tags={"team": "physics"})
    spec = build_spec(config, nprocs=2, server_name="close")

    params = crimpl_ec2.placement_group_params(spec)
    assert (params["GroupName"], params["Strategy"]) == ("crimpl-close-cluster", "cluster")
    tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
    assert tags["crimpl:name"] == "close" and tags["team"] == "physics"
    assert "crimpl:host-key" not in tags and "crimpl:node-rank" not in tags
    for node in spec.nodes:
        run = crimpl_ec2.run_instances_params(node, NEWEST_UBUNTU_LTS, "k", ["sg-1"])
        assert run["Placement"] == {"GroupName": "crimpl-close-cluster"}
    plain = build_spec(AWSEC2_Config(KeyFile=str(key_file), nnodes=2), nprocs=2, server_name="apart")
    assert "Placement" not in crimpl_ec2.run_instances_params(plain, NEWEST_UBUNTU_LTS, "k", ["sg-1"])


def test_an_endpoint_without_placement_groups_is_a_one_line_error_and_nothing_launches(ec2, cluster_config):
    # moto_server 5.2.1 answers CreatePlacementGroup with an HTML error page.
    config = AWSEC2_Config(**{**cluster_config.to_dict(), "placement": "cluster"})

    with pytest.raises(AWSError) as caught:
        AWSEC2.new(config, nprocs=2, nnodes=2, server_name="noplace")

    message = str(caught.value)
    assert "\n" not in message and "placement group crimpl-noplace-cluster" in message
    assert "crimpl:placement" in message
    assert live(ec2, "noplace") == []


# -- the CLI ----------------------------------------------------------------------------------------


def test_status_and_list_show_every_node(ec2, cluster_config):
    server = AWSEC2.new(cluster_config, nprocs=2, nnodes=3, server_name="shown")
    nodes = server.nodes

    status = run_cli("status", "--server", "shown")
    listing = run_cli("list")

    assert status.code == listing.code == 0, (status, listing)
    assert "shown: 3 nodes" in status.stdout
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines() if line.startswith("i-")}
    for node in nodes:
        line = f"shown  node {node.rank}  {node.instanceId}  running  {node.instance_type}"
        assert line in status.stdout
        assert status.stdout.split(line)[1].splitlines()[0].split()[-1] == node.private_ip
        assert rows[node.instanceId][1:3] == [f"shown/{node.rank}", "running"]
        assert rows[node.instanceId][5] == node.private_ip
    assert "warning" not in status.stdout + status.stderr + listing.stdout + listing.stderr


def test_a_stack_grows_and_shrinks_through_the_cli_with_the_boto3_provisioner(ec2, key_file, cluster_network,
                                                                                tmp_path):
    def stack(nodes):
        config = {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:sshCidrs": SSH_CIDRS,
                  "crimpl:subnetId": cluster_network.subnet_id, "crimpl:nodes": nodes}
        (tmp_path / "Pulumi.dev.yaml").write_text(yaml.safe_dump({"config": config}))

    def cli(*args):
        result = run_cli(*args, "--provisioner", "boto3", cwd=tmp_path)
        assert result.code == 0, result
        return result.stdout

    stack(2)
    assert "up would launch c6a.large named crimpl-dev as node(s) 0, 1" in cli("preview")
    cli("up")
    first = ranks_and_ids(ec2, "crimpl-dev")
    stack(3)
    assert "as node(s) 2" in cli("preview")
    grown = cli("up")
    after = ranks_and_ids(ec2, "crimpl-dev")
    assert [r for r, _ in after] == [0, 1, 2] and after[:2] == first
    for rank, instance_id in after:
        assert f"node {rank} {instance_id} (running, " in grown
    stack(1)
    assert "up would terminate node(s) 2, 1" in cli("preview")
    cli("up")
    assert ranks_and_ids(ec2, "crimpl-dev") == first[:1]
    assert "up would change nothing" in cli("preview")
    stopped = run_cli("stop", cwd=tmp_path)
    assert stopped.code == 0 and f"{first[0][1]}: stopped" in stopped.stdout


# -- SSH to each node, with its own pinned key --------------------------------------------------------


def test_each_node_is_reached_over_ssh_with_its_own_key_and_not_with_anothers(aws, key_file, cluster_network,
                                                                                serve_instance, login_user):
    config = AWSEC2_Config(KeyFile=str(key_file), SubnetId=cluster_network.subnet_id, ssh_cidrs=["127.0.0.1/32"],
                           username=login_user, ssh_timeout=20, use_private_ip=True)  # no public IP there
    nodes = AWSEC2.new(config, nprocs=2, nnodes=3, server_name="reach").nodes
    for node in nodes[:2]:
        serve_instance(node.instanceId)
    # Node 2's addresses lead to an sshd holding node 1's key (from node 1's user data).
    serve_instance(nodes[2].instanceId, host_private_pem=instance_host_key(nodes[1].instanceId, aws.environ()))

    for node in nodes[:2]:
        with node.session(start=False) as conn:
            assert conn.run("echo connected", hide=True, in_stream=False).stdout.strip() == "connected"
    with pytest.raises(HostKeyMismatchError, match="does not match the pinned key"):
        with nodes[2].session(start=False, timeout=5):
            pass
